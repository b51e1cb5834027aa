"""Sampling to a folder under faults: a run stopped between writing a file and recording it in the manifest (a
shard, the per-image PNGs, the removal of merged shards) is re-run with no manual cleanup and gives the samples of
an uninterrupted run; ``overwrite`` never removes a file that no run of ``sample_to_folder`` recorded; a damaged
samples file is a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from helpers import tiny_unet, vector_pipeline
from PIL import Image

from score_toolkit import distributed, sample_folder
from score_toolkit.distributed import MANIFEST_NAME, SAMPLES_NAME, load_samples, sample_to_folder
from score_toolkit.pipeline import ScorePipeline

SETTINGS = dict(sampler="euler_maruyama", sampler_options={"num_steps": 2}, seed=3, network_batch_size=4, progress=False)


class _Killed(BaseException):
    """Stands for a SIGKILL at that point (a BaseException, so no ``except Exception`` of the writer catches it)."""


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def test_a_stop_after_a_shard_file_and_before_its_record_needs_no_cleanup(tmp_path, accelerator, monkeypatch):
    out = tmp_path / "out"
    original = sample_folder._write_json

    def stop_at_the_first_complete_record(path, data):
        if any(rec.get("sha256") for rec in data.get("shards", {}).values()):
            raise _Killed("stopped after the shard file was written, before the manifest recorded it")
        original(path, data)

    monkeypatch.setattr(sample_folder, "_write_json", stop_at_the_first_complete_record)
    with pytest.raises(_Killed):
        sample_to_folder(vector_pipeline(), out, 8, batch_size=4, shard_size=4, accelerator=accelerator, **SETTINGS)
    monkeypatch.setattr(sample_folder, "_write_json", original)
    again = sample_to_folder(vector_pipeline(), out, 8, batch_size=4, shard_size=4, accelerator=accelerator, **SETTINGS)
    assert again.shards_written == 2
    clean = sample_to_folder(vector_pipeline(), tmp_path / "clean", 8, batch_size=4, shard_size=4,
                             accelerator=accelerator, **SETTINGS)
    assert torch.equal(load_samples(out), load_samples(clean.samples_file))
    assert not (out / "shards").exists()


def test_a_shard_recorded_as_being_written_is_written_again(tmp_path, accelerator, monkeypatch):
    """The state a SIGKILL right after the shard's rename leaves: the file, and a record without a checksum."""
    out = tmp_path / "out"
    original = sample_folder.atomic_write

    def write_then_stop(path, write, **kwargs):
        result = original(path, write, **kwargs)
        if "shard-00001" in str(path):
            raise _Killed("stopped right after the rename of shard 1")
        return result

    monkeypatch.setattr(sample_folder, "atomic_write", write_then_stop)
    monkeypatch.setattr(distributed, "remove_if_nothing_kept", lambda *a: None)  # a kill runs no handler
    with pytest.raises(_Killed):
        sample_to_folder(vector_pipeline(), out, 8, batch_size=4, shard_size=4, accelerator=accelerator, **SETTINGS)
    shards = json.loads((out / MANIFEST_NAME).read_text())["shards"]
    assert shards["1"]["sha256"] is None and (out / "shards" / "shard-00001.safetensors").is_file()
    monkeypatch.undo()
    again = sample_to_folder(vector_pipeline(), out, 8, batch_size=4, shard_size=4, accelerator=accelerator, **SETTINGS)
    assert (again.shards_skipped, again.shards_written) == (1, 1)
    clean = sample_to_folder(vector_pipeline(), tmp_path / "clean", 8, batch_size=4, shard_size=4,
                             accelerator=accelerator, **SETTINGS)
    assert torch.equal(load_samples(out), load_samples(clean.samples_file))


def test_a_stop_while_removing_merged_shards_is_finished_by_the_rerun(tmp_path, accelerator, monkeypatch):
    out = tmp_path / "out"
    original = sample_folder.remove_written

    def stop_before_removing_shards(root, names, **kwargs):
        if any(n.startswith("shards/") for n in names):
            raise _Killed("stopped after the merge, before the shard files were removed")
        original(root, names, **kwargs)

    monkeypatch.setattr(sample_folder, "remove_written", stop_before_removing_shards)
    with pytest.raises(_Killed):
        sample_to_folder(vector_pipeline(), out, 8, batch_size=4, shard_size=4, accelerator=accelerator, **SETTINGS)
    monkeypatch.setattr(sample_folder, "remove_written", original)
    assert json.loads((out / MANIFEST_NAME).read_text())["complete"] and (out / "shards").is_dir()
    again = sample_to_folder(vector_pipeline(), out, 8, batch_size=4, shard_size=4, accelerator=accelerator, **SETTINGS)
    assert again.shards_written == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert not (out / "shards").exists() and manifest["shards"] == {} and sorted(manifest["merged_shards"]) == ["0", "1"]


def test_a_stop_while_writing_image_files_needs_no_cleanup(tmp_path, accelerator, monkeypatch):
    folder = tmp_path / "rgb"
    ScorePipeline(unet=tiny_unet(3), scheduler=DDPMScheduler(num_train_timesteps=100, beta_end=0.2)).save_pretrained(folder)
    pipe = ScorePipeline.from_pretrained(folder)
    out = tmp_path / "out"
    original, written = sample_folder.atomic_write, []

    def stop_at_the_third_png(path, write, **kwargs):
        if path.suffix == ".png" and path.parent.name == "images":
            written.append(path.name)
            if len(written) == 3:
                raise _Killed("stopped while writing the image files")
        return original(path, write, **kwargs)

    monkeypatch.setattr(sample_folder, "atomic_write", stop_at_the_third_png)
    with pytest.raises(_Killed):
        sample_to_folder(pipe, out, 6, batch_size=4, accelerator=accelerator, image_files=True, **SETTINGS)
    monkeypatch.setattr(sample_folder, "atomic_write", original)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    sample_to_folder(pipe, out, 6, batch_size=4, accelerator=accelerator, image_files=True, **SETTINGS)
    want = sample_folder.to_uint8_images(load_samples(out))
    pngs = sorted((out / "images").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(6)]
    assert all(np.array_equal(np.asarray(Image.open(p)), want[i]) for i, p in enumerate(pngs))
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], want)
    assert json.loads((out / MANIFEST_NAME).read_text())["image_files"]["complete"] is True


@pytest.mark.parametrize("name, content", [("samples.png", b"the user's picture"),
                                           ("samples.safetensors", b"the user's tensors"),
                                           ("manifest.json", b'{"files": ["a data-set manifest of the user"]}'),
                                           ("manifest.json", b"notes, not JSON")])
def test_overwrite_never_removes_what_no_run_recorded(tmp_path, accelerator, name, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(content)
    for overwrite in (False, True):
        with pytest.raises((FileExistsError, ValueError), match="move it away"):
            sample_to_folder(vector_pipeline(), out, 2, batch_size=2, accelerator=accelerator, overwrite=overwrite,
                             **SETTINGS)
        assert (out / name).read_bytes() == content
    assert sorted(p.name for p in out.iterdir()) == [name]


def test_a_damaged_samples_file_is_a_clear_error(tmp_path, accelerator):
    out = tmp_path / "out"
    sample_to_folder(vector_pipeline(), out, 4, batch_size=2, accelerator=accelerator, **SETTINGS)
    data = (out / SAMPLES_NAME).read_bytes()
    (out / SAMPLES_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"corrupt or truncated samples file {out / SAMPLES_NAME}"):
        load_samples(out)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(out / SAMPLES_NAME))
    with pytest.raises(ValueError, match=r"expected a tensor 'samples' in .*, found \['x'\]"):
        load_samples(out)


@pytest.mark.parametrize("name, kind", [("shards", "link"), ("images", "link"), ("shards", "file")])
def test_a_link_or_a_file_in_place_of_a_subfolder_is_refused_before_any_work(tmp_path, accelerator, name, kind,
                                                                            monkeypatch):
    """A shards/ link to a scratch disk made the run sample everything, then fail at the merge (the manifest's
    shard paths led out of the folder), and every re-run again."""
    pipe, image_files = vector_pipeline(), name == "images"
    if image_files:
        ScorePipeline(unet=tiny_unet(1), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "m")
        pipe = ScorePipeline.from_pretrained(tmp_path / "m")
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    out.mkdir()
    scratch.mkdir()
    if kind == "link":
        (out / name).symlink_to(scratch, target_is_directory=True)
    else:
        (out / name).write_text("the user's file")
    calls = []
    monkeypatch.setattr(ScorePipeline, "__call__", lambda self, *a, **k: calls.append(1))
    with pytest.raises(FileExistsError, match=f"{name} is a {'symbolic link' if kind == 'link' else 'file'}"):
        sample_to_folder(pipe, out, 8, batch_size=4, shard_size=4, accelerator=accelerator, image_files=image_files,
                         **SETTINGS)
    assert calls == [] and sorted(p.name for p in out.iterdir()) == [name] and list(scratch.iterdir()) == []
