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


def _mlp_pipeline(seed, hidden=64):
    import torch

    from score_toolkit.models import ScoreMLP
    from score_toolkit.pipeline import ScorePipeline
    from score_toolkit.processes import VPSDE
    from score_toolkit.schedulers import scheduler_for

    torch.manual_seed(seed)
    return ScorePipeline(unet=ScoreMLP(2, hidden_dim=hidden, num_layers=2), scheduler=scheduler_for(VPSDE(), "epsilon", "t"))


def _loads(folder, pipe) -> bool:
    import torch

    from score_toolkit.pipeline import ScorePipeline

    loaded = ScorePipeline.from_pretrained(folder)
    return all(torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(), pipe.unet.state_dict().values()))


@pytest.mark.parametrize("first, second", [("20KB", None), (None, "20KB")])
def test_a_save_over_a_save_of_another_sharding_loads_the_new_weights(tmp_path, first, second):
    """A sharded save left its shards and index beside a later single-file save, and the folder loaded the earlier
    weights through the index, silently."""
    folder = tmp_path / "model"
    _mlp_pipeline(0).save_pretrained(folder, max_shard_size=first)
    _mlp_pipeline(0).save_pretrained(folder, variant="fp16", max_shard_size="20KB")  # another variant: kept
    (folder / "unet" / "notes.txt").write_text("mine")
    new = _mlp_pipeline(1)
    new.save_pretrained(folder, max_shard_size=second)
    assert _loads(folder, new)
    names = sorted(p.name for p in (folder / "unet").iterdir())
    plain = [n for n in names if n.startswith("diffusion_pytorch_model") and ".fp16" not in n]
    assert (plain == ["diffusion_pytorch_model.safetensors"]) == (second is None), names
    assert "notes.txt" in names and "diffusion_pytorch_model.safetensors.index.fp16.json" in names


def test_a_save_into_a_mount_point_uses_a_temporary_folder_inside_it(tmp_path, monkeypatch):
    """A sibling temporary folder of a mount point (a container's volume) is on another file system, where the
    renames failed with EXDEV; this stands for the mount point by what the check reports."""
    import score_toolkit._io as io

    folder = tmp_path / "volume"
    folder.mkdir()
    (folder / "data.txt").write_text("mine")
    sources = []
    replace = io.replace_files
    monkeypatch.setattr(io, "on_own_file_system", lambda path: True)
    monkeypatch.setattr(io, "replace_files", lambda source, target: sources.append(source) or replace(source, target))
    pipe = _mlp_pipeline(0, hidden=8)
    pipe.save_pretrained(folder)
    assert sources and sources[0].parent == folder and sources[0].name.startswith(".save.tmp-")
    assert sorted(p.name for p in folder.iterdir()) == ["data.txt", "model_index.json", "scheduler", "unet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"] and _loads(folder, pipe)


def test_an_export_killed_between_its_renames_is_restored_not_removed(tmp_path):
    """The earlier export, renamed to .NAME.old-PID before the new one took its place, is the only copy: the
    next save or export renames it back (it was removed as a stale temporary)."""
    import subprocess
    import sys

    from score_toolkit import hub
    from score_toolkit.models import ScoreMLP
    from score_toolkit.processes import VPSDE

    folder = hub.export_pipeline(ScoreMLP(2, hidden_dim=8, num_layers=1), VPSDE(), "epsilon", "t", tmp_path / "out")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no longer runs: the killed export's
    os.rename(folder, tmp_path / f".out.old-{gone.pid}")
    (tmp_path / f".out.tmp-{gone.pid}").mkdir()  # its new export, complete or not
    pipe = _mlp_pipeline(0, hidden=8)
    pipe.save_pretrained(tmp_path / "elsewhere")  # another folder's save leaves these alone
    assert (tmp_path / f".out.old-{gone.pid}").is_dir() and not folder.exists()
    with pytest.raises(FileExistsError):  # restored first, so the export without overwrite refuses it
        hub.export_pipeline(ScoreMLP(2, hidden_dim=8, num_layers=1), VPSDE(), "epsilon", "t", folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]
    assert (folder / "model_index.json").is_file()


def test_safe_serialization_false_is_refused_also_by_position(tmp_path):
    with pytest.raises(ValueError, match="expected safe_serialization=True"):
        _mlp_pipeline(0, hidden=8).save_pretrained(tmp_path / "p", False)
    assert not (tmp_path / "p").exists()
