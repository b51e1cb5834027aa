"""Image training sets read lazily: image folders and Hugging Face ``datasets`` (map-style and streamed),
the transforms, the batch order that does not depend on processes or workers, and errors that name the
file or field."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from score_toolkit.data import (
    ImageDataset,
    ImageTransform,
    StreamingImageDataset,
    example_key,
    load_dataset,
    load_hf_dataset,
    load_image_folder,
    training_batches,
)

hf = pytest.importorskip("datasets")


def _write_folder(folder, n=12, size=(10, 10), mode="RGB", seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(folder / f"img{i:03d}.png")
        arrays.append(np.asarray(Image.fromarray(arr).convert(mode)))
    return arrays


def _collect(source, **kw):
    return [x for x, _ in training_batches(source, **kw)]


def _hf_images(n=12, size=8, seed=0, num_classes=None):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    data = {"image": images}
    features = {"image": hf.Image()}
    if num_classes is not None:
        data["label"] = [i % num_classes for i in range(n)]
        features["label"] = hf.ClassLabel(num_classes=num_classes)
    return hf.Dataset.from_dict(data, features=hf.Features(features))


# ------------------------------------------------------------------------------------------ transforms
def test_transform_resizes_the_shorter_side_then_crops_the_centre():
    # 16 wide x 8 high: left quarter black, the middle half grey 128, right quarter white
    arr = np.zeros((8, 16), np.uint8)
    arr[:, 4:12] = 128
    arr[:, 12:] = 255
    out = ImageTransform(image_size=8, channels=1, interpolation="nearest")(Image.fromarray(arr), 0, "x")
    # the shorter side is already 8: only the centre crop, columns 4..11
    assert out.shape == (8, 8, 1) and (out == 128).all()
    out = ImageTransform(image_size=4, channels=1, interpolation="nearest")(Image.fromarray(arr), 0, "x")
    assert out.shape == (4, 4, 1) and (out == 128).all()


def test_transform_flip_and_random_crop_follow_the_key():
    arr = np.arange(8 * 8, dtype=np.uint8).reshape(8, 8) * 3
    im = Image.fromarray(arr)
    flip = ImageTransform(image_size=None, channels=1, random_flip=True)
    assert np.array_equal(flip(im, 2, "x")[:, :, 0], arr)  # even key: as is
    assert np.array_equal(flip(im, 3, "x")[:, :, 0], arr[:, ::-1])  # odd key: mirrored
    crop = ImageTransform(image_size=4, channels=1, center_crop=False)
    big = Image.fromarray(np.arange(4 * 12, dtype=np.uint8).reshape(4, 12))
    crops = {crop(big, example_key(0, s), "x").tobytes() for s in range(40)}
    assert len(crops) > 3  # several positions along the long side
    for c in crops:  # each is a contiguous 4x4 window of the source
        window = np.frombuffer(c, np.uint8).reshape(4, 4)
        left = int(window[0, 0])
        assert np.array_equal(window, np.asarray(big)[:, left:left + 4])
    # keys are a pure function of (seed, slot) and about half of them flip
    keys = [example_key(7, s) for s in range(2000)]
    assert keys == [example_key(7, s) for s in range(2000)]
    assert 0.45 < np.mean([k & 1 for k in keys]) < 0.55


def test_image_folder_values_and_channels(tmp_path):
    arrays = _write_folder(tmp_path / "f", n=3, size=(6, 6))
    ds = load_image_folder(tmp_path / "f", image_size=6, channels=3)
    assert isinstance(ds, ImageDataset) and ds.sample_shape == (3, 6, 6) and len(ds) == 3
    x, labels = ds.examples([2, 0])
    assert labels is None
    want = torch.from_numpy(np.stack([arrays[2], arrays[0]])).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(x, want, atol=1e-6)
    grey = load_image_folder(tmp_path / "f", image_size=6, channels=None)
    assert grey.sample_shape == (3, 6, 6)  # as the images are: RGB
    _write_folder(tmp_path / "g", n=2, size=(6, 6), mode="L")
    assert load_image_folder(tmp_path / "g", image_size=None, channels=None).sample_shape == (1, 6, 6)


# ------------------------------------------------------------------------------------------ laziness
def test_image_folder_reads_files_only_when_a_batch_needs_them(tmp_path):
    _write_folder(tmp_path / "f", n=10, size=(8, 8))
    ds = load_dataset("image_folder", path=str(tmp_path / "f"), image_size=8)
    # replacing a file after loading changes what a batch reads: nothing was cached in memory
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(tmp_path / "f" / "img005.png")
    assert float(ds.examples([5])[0].min()) == 1.0
    # a file corrupted after loading fails only when read, with its path
    (tmp_path / "f" / "img007.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds.examples([1, 2, 3])
    with pytest.raises(ValueError, match=r"cannot read the image .*img007\.png"):
        ds.examples([6, 7])


def test_corrupt_file_in_a_folder_names_its_path_during_training_batches(tmp_path):
    _write_folder(tmp_path / "f", n=6, size=(8, 8))
    (tmp_path / "f" / "img003.png").write_bytes(b"not an image at all")
    ds = load_image_folder(tmp_path / "f", image_size=8)
    with pytest.raises(ValueError, match=r"img003\.png"):
        _collect(ds, seed=0, batch_size=6, stop_step=1, num_workers=1)


# ------------------------------------------------------------------------------------------ batch order
@pytest.mark.parametrize("accumulation", [1, 2])
def test_map_style_batches_do_not_depend_on_processes_or_workers(tmp_path, accumulation):
    _write_folder(tmp_path / "f", n=13, size=(10, 8))
    ds = load_image_folder(tmp_path / "f", image_size=8, random_flip=True)
    kw = {"seed": 3, "batch_size": 8, "gradient_accumulation_steps": accumulation, "stop_step": 5}
    one = _collect(ds, **kw)
    assert len(one) == 5 * accumulation and one[0].shape == (8 // accumulation, 3, 8, 8)
    assert all(torch.equal(a, b) for a, b in zip(one, _collect(ds, num_workers=2, **kw)))
    ranks = [_collect(ds, rank=r, num_processes=2, **kw) for r in range(2)]
    assert all(torch.equal(a, torch.cat([r0, r1])) for a, r0, r1 in zip(one, *ranks))
    # resuming at step 2 gives the remaining batches of the uninterrupted run
    resumed = _collect(ds, start_step=2, **kw)
    assert all(torch.equal(a, b) for a, b in zip(one[2 * accumulation:], resumed))
    # every image appears once per epoch (13 images, 40 slots): flips aside, the first 13 slots are a permutation
    first13 = torch.cat(one)[:13]
    plain = ds.examples(range(13))[0]
    matched = [i for i in range(13) for j in range(13)
               if torch.equal(first13[i], plain[j]) or torch.equal(first13[i], plain[j].flip(-1))]
    assert len(matched) == 13


def test_in_memory_datasets_keep_their_order():
    ds = load_dataset("ring", num_samples=50, seed=0)
    one = _collect(ds, seed=1, batch_size=10, stop_step=7)
    two = [_collect(ds, seed=1, batch_size=10, stop_step=7, rank=r, num_processes=2) for r in range(2)]
    assert all(torch.equal(a, torch.cat([b, c])) for a, b, c in zip(one, *two))
    # one epoch = 5 steps: each point once
    assert torch.equal(torch.cat(one[:5]).sort(0).values, ds.data.sort(0).values)


# ------------------------------------------------------------------------------------------ datasets sources
def test_hf_imagefolder_parquet_arrow_and_a_dataset_object_agree(tmp_path):
    arrays = _write_folder(tmp_path / "f", n=5, size=(8, 8))
    cache = tmp_path / "cache"
    a = load_dataset("hf", path="imagefolder", data_dir=str(tmp_path / "f"), cache_dir=str(cache))
    assert isinstance(a, ImageDataset) and a.sample_shape == (3, 8, 8) and len(a) == 5
    want = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(a.examples(range(5))[0], want)
    ds = hf.Dataset.from_dict({"image": [Image.fromarray(x) for x in arrays]}, features=hf.Features({"image": hf.Image()}))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    b = load_dataset("hf", path=str(tmp_path / "d.parquet"), cache_dir=str(cache))
    assert torch.allclose(b.examples(range(5))[0], want)
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next(p for p in os.listdir(tmp_path / "saved") if p.endswith(".arrow"))
    c = load_hf_dataset(str(tmp_path / "saved" / arrow), cache_dir=str(cache))
    assert torch.allclose(c.examples(range(5))[0], want)
    d = load_hf_dataset(dataset=ds)
    assert torch.allclose(d.examples(range(5))[0], want)


def test_hf_hub_id_from_the_local_cache_offline(tmp_path, monkeypatch):
    """A Hub id resolves from the datasets cache when HF_HUB_OFFLINE=1 (no network): the cache layout of a
    dataset prepared once (<cache>/<namespace>___<name>/<config>/<version>/<hash>)."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    _hf_images(6, num_classes=3).to_parquet(str(tmp_path / "train.parquet"))
    cache = tmp_path / "cache"
    builder = Parquet(cache_dir=str(cache), dataset_name="tiny", data_files={"train": [str(tmp_path / "train.parquet")]},
                      hash="0" * 16)
    builder.download_and_prepare()
    config = next((cache / "tiny").iterdir())
    config.rename(cache / "tiny" / "default")
    (cache / "tiny").rename(cache / "someone___tiny")
    ds = load_dataset("hf", path="someone/tiny", label_column="label", cache_dir=str(cache))
    assert len(ds) == 6 and ds.hub_id == "someone/tiny" and ds.num_classes == 3
    x, labels = ds.examples([0, 4])
    assert x.shape == (2, 3, 8, 8) and labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match="someone/missing.*HF_HUB_OFFLINE|someone/missing"):
        load_dataset("hf", path="someone/missing", cache_dir=str(cache))


@pytest.fixture
def no_stream_shutdown_sleep(monkeypatch):
    # datasets sleeps SLEEP_TIME_ON_THREADS_SHUTDOWN (5 s) after each pass over parquet shards; a pass here is 20 rows
    monkeypatch.setattr(hf.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def test_hf_streaming_batches_do_not_depend_on_processes_workers_or_resume(tmp_path, no_stream_shutdown_sleep):
    _hf_images(20).to_parquet(str(tmp_path / "d.parquet"))
    ds = load_dataset("hf", path=str(tmp_path / "d.parquet"), streaming=True, random_flip=True, shuffle_buffer=8,
                      cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds, StreamingImageDataset) and ds.sample_shape == (3, 8, 8)
    with pytest.raises(TypeError):
        len(ds)
    kw = {"seed": 5, "batch_size": 8, "stop_step": 6}  # 48 slots: crosses two epoch boundaries
    one = _collect(ds, **kw)
    assert len(one) == 6
    assert all(torch.equal(a, b) for a, b in zip(one, _collect(ds, num_workers=2, **kw)))
    ranks = [_collect(ds, rank=r, num_processes=2, num_workers=1, **kw) for r in range(2)]
    assert all(torch.equal(a, torch.cat([r0, r1])) for a, r0, r1 in zip(one, *ranks))
    assert all(torch.equal(a, b) for a, b in zip(one[3:], _collect(ds, start_step=3, **kw)))
    # each epoch is a reshuffle of all 20 images (up to flips): slots 0..19 and 20..39 are permutations
    plain = ds.head(20)
    flat = torch.cat(one)

    def canon(x):
        return sorted(min(tuple(v.flatten().tolist()), tuple(v.flip(-1).flatten().tolist())) for v in x)

    assert canon(flat[:20]) == canon(plain) and canon(flat[20:40]) == canon(plain)
    assert not torch.equal(flat[:20], flat[20:40])  # a new order in the second epoch


def _canon(x):
    return [tuple(v.flatten().tolist()) for v in x]


def test_hf_streamed_parquet_is_read_one_row_group_at_a_time(tmp_path, no_stream_shutdown_sleep):
    # pyarrow's scanner reads the rest of a parquet file ahead while the consumer is slow; as one shard per
    # row group fed to the shuffle buffer one at a time, memory is bounded by a row group, not the file
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    _hf_images(40).to_parquet(str(path), batch_size=10)
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    ds = load_dataset("hf", path=str(path), streaming=True, shuffle_buffer=5, cache_dir=str(tmp_path / "cache"))
    assert ds.stream.num_shards == 4
    group_of = {img: i // 10 for i, img in enumerate(_canon(ds.head(40)))}
    firsts = set()
    for seed in range(4):
        shuffled = _canon(ds.draw(5, seed))
        groups = {group_of[img] for img in shuffled}
        assert len(groups) == 1, f"seed {seed}: the first 5 examples mix row groups {sorted(groups)}"
        firsts |= groups
    assert len(firsts) > 1  # the order of the row groups is shuffled too


def test_hf_streamed_parquet_with_large_row_groups_warns_naming_the_file(tmp_path, monkeypatch,
                                                                       no_stream_shutdown_sleep):
    from score_toolkit.data import hf_datasets

    whole, split = tmp_path / "whole.parquet", tmp_path / "split.parquet"
    _hf_images(12).to_parquet(str(whole))
    _hf_images(12).to_parquet(str(split), batch_size=3)
    monkeypatch.setattr(hf_datasets, "ROW_GROUP_WARN_BYTES", 100)  # each 8x8 image is ~200 bytes of PNG
    cache = str(tmp_path / "cache")
    with pytest.warns(hf_datasets.StreamingMemoryWarning, match=r"whole\.parquet: the whole file is one row group.*row_group_size") as rec:
        load_dataset("hf", path=str(whole), streaming=True, cache_dir=cache)
    assert {w.filename for w in rec if issubclass(w.category, hf_datasets.StreamingMemoryWarning)} == {__file__}
    with pytest.warns(hf_datasets.StreamingMemoryWarning, match=r"split\.parquet: row group \d of 4"):
        load_dataset("hf", path="parquet", data_files=str(tmp_path / "split.*"), streaming=True, cache_dir=cache)
    monkeypatch.setattr(hf_datasets, "ROW_GROUP_WARN_BYTES", 10 ** 6)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", hf_datasets.StreamingMemoryWarning)
        load_dataset("hf", path=str(whole), streaming=True, cache_dir=cache)
        monkeypatch.setattr(hf_datasets, "ROW_GROUP_WARN_BYTES", 100)
        load_dataset("hf", path=str(whole), cache_dir=cache)  # map-style: read through the memory-mapped cache


def test_hf_labels(tmp_path):
    ds = load_hf_dataset(dataset=_hf_images(6, num_classes=3), label_column="label")
    assert ds.num_classes == 3
    x, labels = next(training_batches(ds, seed=0, batch_size=6, stop_step=1))
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]


# ------------------------------------------------------------------------------------------ errors
def test_missing_image_column_names_the_field(tmp_path):
    ds = hf.Dataset.from_dict({"img": [Image.new("RGB", (4, 4))] * 2}, features=hf.Features({"img": hf.Image()}))
    with pytest.raises(ValueError, match=r"expected a column 'image' \(data option image_column\).*\['img'\]"):
        load_hf_dataset(dataset=ds)
    assert load_hf_dataset(dataset=ds, image_column="img").sample_shape == (3, 4, 4)
    with pytest.raises(ValueError, match=r"column 'label' \(data option label_column\)"):
        load_hf_dataset(dataset=ds, image_column="img", label_column="label")


def test_mixed_sizes_without_resize_name_the_file(tmp_path):
    _write_folder(tmp_path / "f", n=3, size=(8, 8))
    Image.new("RGB", (9, 8)).save(tmp_path / "f" / "odd.png")
    ds = load_image_folder(tmp_path / "f", image_size=None)
    assert ds.sample_shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"odd\.png is 9x8 pixels but the first image is 8x8.*image_size"):
        ds.examples(range(4))
    assert load_image_folder(tmp_path / "f", image_size=8).examples(range(4))[0].shape == (4, 3, 8, 8)
    rows = hf.Dataset.from_dict({"image": [Image.new("L", (4, 4)), Image.new("L", (5, 4))]},
                                features=hf.Features({"image": hf.Image()}))
    with pytest.raises(ValueError, match=r"row 1 \(column 'image'\) is 5x4 pixels"):
        load_hf_dataset(dataset=rows).examples([0, 1])


def test_corrupt_image_in_a_datasets_imagefolder_names_its_path(tmp_path):
    _write_folder(tmp_path / "f", n=3, size=(8, 8))
    ds = load_hf_dataset("imagefolder", data_dir=str(tmp_path / "f"), cache_dir=str(tmp_path / "cache"))
    # the cache keeps paths for image folders read by datasets; corrupt one after loading
    (tmp_path / "f" / "img002.png").write_bytes(b"garbage")
    try:
        x = ds.examples([2])[0]
    except ValueError as err:
        assert "img002.png" in str(err) or "row 2" in str(err)
    else:  # datasets embedded the bytes when it prepared the split: the corrupt file is never read again
        assert x.shape == (1, 3, 8, 8)
    rows = hf.Dataset.from_dict({"image": [{"bytes": b"garbage", "path": "photos/broken.jpg"}]},
                                features=hf.Features({"image": hf.Image()}))
    with pytest.raises(ValueError, match=r"photos/broken\.jpg"):
        load_hf_dataset(dataset=rows, channels=3).examples([0])


def test_labels_out_of_range_name_the_column_and_row():
    ds = hf.Dataset.from_dict({"image": [Image.new("L", (4, 4))] * 3, "y": [0, 1, 7]},
                              features=hf.Features({"image": hf.Image(), "y": hf.Value("int64")}))
    src = load_hf_dataset(dataset=ds, label_column="y", num_classes=3)
    assert src.examples([0, 1])[1].tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"row 2 .*label 7 in column 'y' is out of range: expected 0 \.\. 2"):
        src.examples([2])
    with pytest.raises(ValueError, match="num_classes = 5 but column 'label' is a ClassLabel with 3 classes"):
        load_hf_dataset(dataset=_hf_images(3, num_classes=3), label_column="label", num_classes=5)


def test_bad_options():
    with pytest.raises(TypeError, match="unknown option"):
        load_dataset("hf", path="x", imagesize=8)
    with pytest.raises(ValueError, match="needs the option path"):
        load_dataset("hf")
    with pytest.raises(ValueError, match="interpolation"):
        load_dataset("hf", path="x", interpolation="cubic")
    with pytest.raises(ValueError, match="channels 1 .grey., 3 .RGB."):
        load_dataset("hf", path="x", channels=4)
