"""Training data sets: shapes, ranges, determinism, the geometry of the toy sets, and clear errors for bad data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from score_toolkit.data import DATASETS, TOY_DATASETS, load_dataset, load_image_folder, load_vectors, toy_data


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_sets_are_2d_finite_and_seeded(name):
    a = load_dataset(name, num_samples=500, seed=3)
    b = load_dataset(name, num_samples=500, seed=3)
    c = load_dataset(name, num_samples=500, seed=4)
    assert a.data.shape == (500, 2) and a.data.dtype == torch.float32
    assert torch.isfinite(a.data).all()
    assert torch.equal(a.data, b.data)
    assert not torch.equal(a.data, c.data)
    assert a.sample_shape == (2,) and not a.is_image
    # all toy sets live in the plotting extent
    assert a.data.abs().max() < 6.0


def test_ring_matches_its_mixture():
    ds = toy_data("ring", num_samples=4000, seed=0)
    r = ds.data.double().norm(dim=1)
    assert abs(float(r.mean()) - 4.0) < 0.02
    # each sample's nearest mode is at distance ~ std 0.2 (mean of a Rayleigh(0.2) is 0.2 sqrt(pi/2))
    d = torch.cdist(ds.data.double(), ds.mixture.means).min(1).values
    assert abs(float(d.mean()) - 0.2 * math.sqrt(math.pi / 2)) < 0.01
    # equal weights: every mode gets about 1/8 of the points
    counts = torch.bincount(torch.cdist(ds.data.double(), ds.mixture.means).argmin(1), minlength=8).double()
    assert float((counts / 4000 - 1 / 8).abs().max()) < 0.02


def test_checkerboard_points_are_on_dark_squares():
    x = toy_data("checkerboard", num_samples=4000).data.double()
    # squares of side 2 on [-4, 4]^2; points lie where floor(x/2) + floor(y/2) is even
    parity = (torch.floor(x[:, 0] / 2) + torch.floor(x[:, 1] / 2)) % 2
    assert bool((parity == 0).all())
    assert float(x.min()) >= -4 and float(x.max()) <= 4
    assert abs(float(x.mean(0).abs().max())) < 0.15


def test_circles_have_two_radii():
    x = toy_data("circles", num_samples=4000, noise=0.0).data.double()
    r = x.norm(dim=1)
    inner, outer = r[r < 3], r[r >= 3]
    assert torch.allclose(inner, torch.full_like(inner, 2.0), atol=1e-5)
    assert torch.allclose(outer, torch.full_like(outer, 4.0), atol=1e-5)
    assert abs(len(inner) / 4000 - 0.5) < 0.05


def test_moons_and_swiss_roll_shapes():
    m = toy_data("moons", num_samples=2000, noise=0.0).data.double()
    # without noise each moon is a half circle of radius 2.5 around (-1.25, -0.625) or (1.25, 0.625)
    c1, c2 = torch.tensor([-1.25, -0.625], dtype=torch.float64), torch.tensor([1.25, 0.625], dtype=torch.float64)
    on1, on2 = ((m - c1).norm(dim=1) - 2.5).abs() < 1e-5, ((m - c2).norm(dim=1) - 2.5).abs() < 1e-5
    assert bool((on1 | on2).all())
    assert abs(float(on1.double().mean()) - 0.5) < 0.05
    s = toy_data("swiss_roll", num_samples=2000, noise=0.0).data.double()
    # the roll's radius equals its angle parameter / 3.5: between 1.5 pi / 3.5 and 4.5 pi / 3.5
    r = s.norm(dim=1)
    assert float(r.min()) >= 1.5 * math.pi / 3.5 - 1e-5 and float(r.max()) <= 4.5 * math.pi / 3.5 + 1e-5


def test_digits():
    ds = load_dataset("digits")
    assert ds.data.shape == (1797, 1, 8, 8) and ds.is_image
    assert float(ds.data.min()) == -1.0 and float(ds.data.max()) == 1.0
    # 17 grey levels 0..16 mapped to k / 8 - 1
    levels = torch.unique(ds.data)
    assert len(levels) == 17 and torch.allclose(levels, torch.arange(17) / 8 - 1)


def _write_images(folder, n=3, size=(12, 10), mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        arrays.append(arr)
        Image.fromarray(arr).convert(mode).save(folder / f"img{i}.png")
    return arrays


def test_image_folder(tmp_path):
    _write_images(tmp_path / "imgs", n=3)
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(tmp_path / "imgs" / "sub.jpg")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    ds = load_dataset("image_folder", path=str(tmp_path / "imgs"), image_size=6, channels=3)
    assert ds.data.shape == (4, 3, 6, 6)
    assert float(ds.data.min()) >= -1 and float(ds.data.max()) <= 1
    # the white JPEG maps to 1 (up to JPEG rounding), sorted by file name: img0, img1, img2, sub
    assert float(ds.data[3].min()) > 0.95
    grey = load_image_folder(tmp_path / "imgs", image_size=4, channels=1)
    assert grey.data.shape == (4, 1, 4, 4)


def test_image_folder_identity_when_size_matches(tmp_path):
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    (tmp_path / "a").mkdir()
    Image.fromarray(arr, mode="L").save(tmp_path / "a" / "x.png")
    ds = load_image_folder(tmp_path / "a", image_size=8, channels=1)
    expected = torch.from_numpy(arr.astype(np.float32)) / 127.5 - 1
    assert torch.allclose(ds.data[0, 0], expected, atol=1e-6)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_dataset("image_folder", path=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="expected a folder"):
        load_dataset("image_folder", path=str(tmp_path / "missing"))
    _write_images(tmp_path / "bad", n=1)
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="cannot read the image .*broken.png"):
        load_dataset("image_folder", path=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="channels"):
        load_dataset("image_folder", path=str(tmp_path / "bad"), channels=2)


def test_vectors_npy_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float64)
    np.save(tmp_path / "v.npy", x)
    ds = load_dataset("vectors", path=str(tmp_path / "v.npy"))
    assert ds.data.shape == (50, 3) and torch.allclose(ds.data, torch.from_numpy(x).float())
    save_file({"a": torch.ones(4, 2), "b": torch.zeros(5, 3)}, str(tmp_path / "v.safetensors"))
    assert load_vectors(tmp_path / "v.safetensors", key="b").data.shape == (5, 3)
    with pytest.raises(ValueError, match="name one with the option key"):
        load_vectors(tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match="expected a tensor 'c'"):
        load_vectors(tmp_path / "v.safetensors", key="c")


def test_vectors_bad_data(tmp_path):
    x = np.ones((10, 2))
    x[7, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(ValueError, match="NaN or infinity in 1 of 10 samples .first at row 7"):
        load_dataset("vectors", path=str(tmp_path / "nan.npy"))
    np.save(tmp_path / "flat.npy", np.ones(10))
    with pytest.raises(ValueError, match="rank >= 2"):
        load_dataset("vectors", path=str(tmp_path / "flat.npy"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled objects are refused"):
        load_dataset("vectors", path=str(tmp_path / "obj.npy"))
    np.save(tmp_path / "empty.npy", np.ones((0, 3)))
    with pytest.raises(ValueError, match="at least one sample"):
        load_dataset("vectors", path=str(tmp_path / "empty.npy"))
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"\.npy or \.safetensors"):
        load_dataset("vectors", path=str(tmp_path / "x.csv"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="cannot read .* as safetensors"):
        load_dataset("vectors", path=str(tmp_path / "bad.safetensors"))


def test_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown dataset 'rings'. Did you mean 'ring'.*Available"):
        load_dataset("rings")
    with pytest.raises(TypeError, match="unknown option.*'nosie'.*noise"):
        load_dataset("moons", nosie=0.1)
    with pytest.raises(ValueError, match="num_samples"):
        load_dataset("ring", num_samples=0)
    assert set(TOY_DATASETS) < set(DATASETS)
