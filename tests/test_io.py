"""Crash-safe writing (score_toolkit._io), used by every module that writes files."""

import json
import os
import stat

import pytest

from score_toolkit._io import atomic_write, default_file_mode, sha256_file, write_json_atomic, write_text_atomic


def test_new_file_gets_the_permissions_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    ours = write_text_atomic(tmp_path / "sub" / "ours.txt", "x")  # the folder is created
    assert stat.S_IMODE(os.stat(ours).st_mode) == stat.S_IMODE(os.stat(plain).st_mode) == default_file_mode()


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    write_json_atomic(target, {"v": 1})

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write('{"v": 2')  # half written
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_json_round_trip_and_hash(tmp_path):
    p = write_json_atomic(tmp_path / "b.json", {"a": [1, 2.5], "b": "s"}, default=str)
    assert json.loads(p.read_text()) == {"a": [1, 2.5], "b": "s"}
    import hashlib

    assert sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()


def test_save_png_uses_the_shared_writer(tmp_path):
    from PIL import Image

    from score_toolkit.plotting import save_png

    p = save_png(Image.new("RGB", (4, 3), "white"), tmp_path / "x.png")
    assert stat.S_IMODE(os.stat(p).st_mode) == default_file_mode()
    assert Image.open(p).size == (4, 3)


def test_probe_writable_leaves_nothing_and_reports_a_missing_folder(tmp_path):
    from score_toolkit._io import probe_writable

    probe_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):
        probe_writable(tmp_path / "missing")


def test_an_interrupted_pipeline_save_keeps_every_earlier_file_whole(tmp_path, monkeypatch):
    """diffusers' save_pretrained writes the weights in place: a save stopped midway over an earlier one left a
    half-written weight file that no longer loaded."""
    import safetensors.torch
    import torch

    from score_toolkit.models import ScoreMLP
    from score_toolkit.pipeline import ScorePipeline
    from score_toolkit.processes import VPSDE
    from score_toolkit.schedulers import scheduler_for

    def pipeline(seed):
        torch.manual_seed(seed)
        return ScorePipeline(unet=ScoreMLP(2, hidden_dim=8, num_layers=1), scheduler=scheduler_for(VPSDE(), "epsilon", "t"))

    folder = tmp_path / "model"
    first = pipeline(0)
    first.save_pretrained(folder)
    (folder / "notes.txt").write_text("kept")
    original = safetensors.torch.save_file

    def half_then_stop(tensors, filename, metadata=None):
        original(tensors, filename, metadata=metadata)
        data = open(filename, "rb").read()
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        raise KeyboardInterrupt("stopped while writing the weights")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_stop)
    with pytest.raises(KeyboardInterrupt):
        pipeline(1).save_pretrained(folder)
    monkeypatch.undo()
    loaded = ScorePipeline.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(), first.unet.state_dict().values()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left
    second = pipeline(1)
    second.save_pretrained(folder)
    loaded = ScorePipeline.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(), second.unet.state_dict().values()))
    assert (folder / "notes.txt").read_text() == "kept"  # a save replaces its own files, nothing else
    assert stat.S_IMODE(os.stat(folder / "unet" / "config.json").st_mode) == default_file_mode()
    with pytest.raises(ValueError, match="expected safe_serialization=True .*found False"):  # a folder it cannot load
        second.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert not (tmp_path / "pickled").exists()
