"""Sampling at image scale: a reduced-precision network on float32 sampler states, per-image PNGs and an .npz
for FID tools, and the sample command's --dtype and --image-files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from helpers import tiny_unet
from PIL import Image

from score_toolkit.cli import main
from score_toolkit.distributed import load_samples, sample_to_folder, to_uint8_images
from score_toolkit.pipeline import ScorePipeline


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "rgb"
    ScorePipeline(unet=tiny_unet(3), scheduler=DDPMScheduler(num_train_timesteps=100, beta_end=0.2)).save_pretrained(folder)
    return folder


SETTINGS = dict(sampler="dpmpp_2m", sampler_options={"num_steps": 5}, seed=3, network_batch_size=4, progress=False)


def test_bfloat16_network_samples_float32_states_close_to_float32(rgb_folder):
    full = ScorePipeline.from_pretrained(rgb_folder)
    half = ScorePipeline.from_pretrained(rgb_folder, torch_dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    a = full(shape=(4, 3, 8, 8), sampler="dpmpp_2m", num_steps=5, generator=gens, output_type="pt").samples
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    b = half(shape=(4, 3, 8, 8), sampler="dpmpp_2m", num_steps=5, generator=gens, output_type="pt").samples
    assert b.dtype == torch.float32
    # same noise, network in bfloat16 (8 bits of mantissa): close, not equal
    err = float((a - b).abs().max())
    assert 0 < err < 0.1 * float(a.abs().max())


def test_image_files_match_the_samples(tmp_path, rgb_folder):
    pipe = ScorePipeline.from_pretrained(rgb_folder)
    acc = Accelerator(cpu=True)
    out = tmp_path / "s"
    res = sample_to_folder(pipe, out, 6, batch_size=4, accelerator=acc, image_files=True, **SETTINGS)
    samples = load_samples(out)
    want = to_uint8_images(samples)
    pngs = sorted((out / "images").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(6)] and res.images_dir == out / "images"
    for i, p in enumerate(pngs):
        assert np.array_equal(np.asarray(Image.open(p)), want[i])
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (6, 8, 8, 3)
    assert np.array_equal(npz["arr_0"], want)
    # the pixel rule: round((x + 1) * 127.5) clipped
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).reshape(1, 1, 2, 3)
    assert to_uint8_images(x).ravel().tolist() == [0, 0, 128, 255, 255, 255]
    # overwrite removes only what the run wrote: a foreign file in images/ stops it
    (out / "images" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="did not write"):
        sample_to_folder(pipe, out, 4, batch_size=4, accelerator=acc, image_files=True, overwrite=True,
                         **{**SETTINGS, "seed": 4})
    assert (out / "images" / "mine.txt").read_text() == "keep me"
    (out / "images" / "mine.txt").unlink()
    sample_to_folder(pipe, out, 4, batch_size=4, accelerator=acc, image_files=True, overwrite=True,
                     **{**SETTINGS, "seed": 4})
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(4)]


def test_image_files_need_images(tmp_path):
    from score_toolkit.models import ScoreMLP
    from score_toolkit.processes import VPSDE
    from score_toolkit.schedulers import scheduler_for

    pipe = ScorePipeline(unet=ScoreMLP(2, hidden_dim=8, num_layers=1).eval(), scheduler=scheduler_for(VPSDE(), "epsilon", "t"))
    with pytest.raises(ValueError, match="image_files needs image samples"):
        sample_to_folder(pipe, tmp_path / "v", 4, accelerator=Accelerator(cpu=True), image_files=True, **SETTINGS)


def test_sample_command_dtype_and_image_files(tmp_path, rgb_folder, capsys):
    out = tmp_path / "cli"
    code = main(["sample", str(rgb_folder), "--num-samples", "5", "--batch-size", "5", "--steps", "4", "--cpu",
                 "--dtype", "bfloat16", "--image-files", "--output-dir", str(out), "--no-progress"])
    assert code == 0
    assert len(list((out / "images").glob("*.png"))) == 5
    assert np.load(out / "samples.npz")["arr_0"].shape == (5, 8, 8, 3)
    import json

    assert json.loads((out / "manifest.json").read_text())["run"]["dtype"] == "torch.bfloat16"
    assert "PNG files" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["sample", str(rgb_folder), "--dtype", "float8", "--output-dir", str(tmp_path / "x")])
    assert exc.value.code == 2 and "invalid choice: 'float8'" in capsys.readouterr().err
