"""Training under faults: SIGKILL during a checkpoint write and during the export, a full disk (a patched writer
and a real file-size limit), divergence between log steps, export folders that overlap the run, and logs that
stay identical to an uninterrupted run across a resume. After each fault ``--resume`` works with no manual
cleanup, and nothing written before the fault is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from helpers import small_run_config
from safetensors.torch import load_file

from score_toolkit import training
from score_toolkit.training import ConfigError, list_checkpoints, prepare_run, train, verify_checkpoint

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def small_config(out, **sections) -> dict:
    train_defaults = {"steps": 12, "batch_size": 32, "checkpoint_every": 4, "log_every": 3, "keep_checkpoints": 5}
    return small_run_config(out, num_samples=1000, train_defaults=train_defaults, **sections)


def _metrics(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _residue(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------ item 10: logs across a resume
def test_metrics_after_a_resume_equal_the_uninterrupted_run(tmp_path):
    """log_every = 3 does not divide checkpoint_every = 4: the checkpoint at step 8 cuts the window 7..9."""
    straight = train(small_config(tmp_path / "straight"))
    crashed = tmp_path / "crashed"

    def crash(info):
        if info["step"] == 10:
            raise KeyboardInterrupt  # a crash between checkpoints, after the log of step 9

    with pytest.raises(KeyboardInterrupt):
        train(small_config(crashed), callbacks=[crash])
    assert [s for s, _ in _metrics(crashed)] == [3, 6, 9]
    resumed = train(small_config(crashed), resume=True)
    assert resumed.resumed_from.name == "step_0000008"
    assert _metrics(crashed) == _metrics(straight.run_dir)  # each step once, the same losses
    assert _same(_weights(crashed / "checkpoints" / "step_0000012"),
                 _weights(straight.run_dir / "checkpoints" / "step_0000012"))


# ------------------------------------------------------------------------ item 3: NaN before a checkpoint
def test_divergence_between_log_steps_never_reaches_a_checkpoint(tmp_path):
    run = tmp_path / "run"

    def poison(info):
        if info["step"] == 6:
            with torch.no_grad():
                next(info["model"].parameters()).fill_(float("nan"))

    cfg = small_config(run, train={"log_every": 100, "keep_checkpoints": 1})
    with pytest.raises(FloatingPointError, match="before the checkpoint of step 8.*the last checkpoint is 4"):
        train(cfg, callbacks=[poison])
    assert [s for s, _ in list_checkpoints(run)] == [4]  # the good one was not rotated out
    assert verify_checkpoint(run / "checkpoints" / "step_0000004") == (True, "ok")
    assert all(torch.isfinite(v).all() for v in _weights(run / "checkpoints" / "step_0000004").values())
    assert _residue(run) == []


# ------------------------------------------------------------------------ item 2: overlapping export folders
@pytest.mark.parametrize("where", ["run", "parent", "grandparent", "checkpoints"])
def test_export_folders_that_overlap_the_run_are_refused(tmp_path, where):
    run = tmp_path / "top" / "runs" / "r1"
    folder = {"run": run, "parent": run.parent, "grandparent": run.parent.parent,
              "checkpoints": run / "checkpoints" / "pipe"}[where]
    (run.parent / "r0").mkdir(parents=True)
    (run.parent / "r0" / "keep.txt").write_text("a sibling run")
    cfg = small_config(run, export={"enabled": True, "folder": str(folder), "overwrite": True})
    with pytest.raises(ConfigError, match="export folder .* (is the run folder itself|holds the run folder|inside the run's own checkpoints)"):
        prepare_run(cfg)
    assert (run.parent / "r0" / "keep.txt").read_text() == "a sibling run"
    # the default place and a folder beside the run are fine
    prepare_run(small_config(run, export={"enabled": True}))
    prepare_run(small_config(run, export={"enabled": True, "folder": str(run.parent / "export"), "overwrite": True}))


# ------------------------------------------------------------------------ item 4: a full disk
def test_a_full_disk_during_a_checkpoint_says_so_leaves_no_residue_and_resume_works(tmp_path, monkeypatch):
    """A patched writer: torch's own message when a write comes up short ("unexpected pos"), after half the
    file is written, at the second checkpoint."""
    run = tmp_path / "run"
    straight = train(small_config(tmp_path / "straight"))
    real_save = torch.save

    def short_write(obj, f, *args, **kwargs):
        if ".tmp-step_0000008" in str(f):  # the first pickle of the checkpoint of step 8
            Path(f).write_bytes(b"\0" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 1088")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(OSError, match="checkpoint of step 8 .*no space left on the device") as info:
        train(small_config(run))
    assert "earlier checkpoints are intact" in str(info.value) and "--resume" in str(info.value)
    monkeypatch.undo()
    assert _residue(run) == [] and [s for s, _ in list_checkpoints(run)] == [4]
    resumed = train(small_config(run), resume=True)
    assert resumed.resumed_from.name == "step_0000004"
    assert _same(_weights(run / "checkpoints" / "step_0000012"),
                 _weights(straight.run_dir / "checkpoints" / "step_0000012"))
    assert _metrics(run) == _metrics(straight.run_dir)


def test_stale_temporaries_of_earlier_processes_are_cleaned_on_resume_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    train(small_config(run, train={"steps": 8}))
    root = run / "checkpoints"
    for name in (".tmp-step_0000010", ".trash-step_0000004-99999"):  # step 10 is never written again
        (root / name).mkdir()
        (root / name / "optimizer.bin").write_bytes(b"\0" * 1000)
    for name in (".my-notes", ".trash-notes"):  # not names the checkpoint writer uses
        (root / name).mkdir()
    (root / "README.txt").write_text("the user's")
    train(small_config(run), resume=True)
    assert _residue(run) == [".my-notes", ".trash-notes"] and (root / "README.txt").read_text() == "the user's"


@pytest.mark.slow  # two fresh interpreters training a small network: about 30 s on a loaded machine
def test_a_real_file_size_limit_during_a_checkpoint(tmp_path):
    """resource.setrlimit(RLIMIT_FSIZE): the write of the checkpoint's optimizer state fails with EFBIG (SIGXFSZ
    ignored, as a shell's ulimit -f does not). The error names the limit, nothing is left behind, and a resume
    without the limit finishes the run with the same weights as an uninterrupted one."""
    run = tmp_path / "run"
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(small_config(run)))
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import torch
        torch.set_num_threads(1)
        from score_toolkit import training
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        real = training.checkpoints._write_checkpoint
        def limited(accelerator, tmp, *args, **kwargs):
            if tmp.name == ".tmp-step_0000008":
                resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            return real(accelerator, tmp, *args, **kwargs)
        training.checkpoints._write_checkpoint = limited
        try:
            training.train(training.load_config({str(cfg_file)!r}))
        except OSError as err:
            print("ERROR:", err)
            sys.exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "checkpoint of step 8" in proc.stdout and "file-size limit" in proc.stdout, proc.stdout
    assert _residue(run) == [] and [s for s, _ in list_checkpoints(run)] == [4]
    resumed = train(training.load_config(cfg_file), resume=True)
    assert resumed.step == 12
    straight = train(small_config(tmp_path / "straight"))
    assert _same(_weights(run / "checkpoints" / "step_0000012"),
                 _weights(straight.run_dir / "checkpoints" / "step_0000012"))


# ------------------------------------------------------------------------ SIGKILL during checkpoint and export
_KILL_SCRIPT = """
import os, signal
import torch
torch.set_num_threads(1)
from score_toolkit import hub, training
where = {where!r}
if where == "checkpoint":
    real = training.checkpoints._fsync_file
    def fsync_file(path):
        real(path)
        if ".tmp-step_0000008" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
    training.checkpoints._fsync_file = fsync_file
else:
    real_render = hub.render_model_card
    def render(*args, **kwargs):  # the network and scheduler are written by now, the card not yet
        os.kill(os.getpid(), signal.SIGKILL)
    hub.render_model_card = render
training.train(training.load_config({cfg!r}))
"""


@pytest.mark.slow  # fresh interpreters and an export: about 40 s on a loaded machine
@pytest.mark.parametrize("where", ["checkpoint", "export"])
def test_sigkill_then_resume_needs_no_cleanup_and_loses_nothing(tmp_path, where):
    run = tmp_path / "run"
    export = {"enabled": True, "num_samples": 64, "sampler_options": {"num_steps": 4}}
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(small_config(run, export=export)))
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT.format(where=where, cfg=str(cfg_file))],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    done = [4] if where == "checkpoint" else [4, 8, 12]
    assert [s for s, _ in list_checkpoints(run)] == done
    kept = {s: _weights(p) for s, p in list_checkpoints(run)}
    if where == "checkpoint":
        assert _residue(run) == [".tmp-step_0000008"]
    else:
        assert [p.name for p in run.iterdir() if p.name.startswith(".pipeline.tmp-")]
        assert not (run / "pipeline").exists()
    from score_toolkit.cli import main

    assert main(["train", "--config", str(cfg_file), "--resume", "--no-fit-grid"]) == 0  # the command, no cleanup
    assert (run / "pipeline" / "model_index.json").is_file()
    assert json.loads((run / "checkpoints" / "step_0000012" / "trainer_state.json").read_text())["step"] == 12
    assert _residue(run) == [] and not [p for p in run.iterdir() if ".tmp-" in p.name]
    for s, w in kept.items():  # nothing written before the kill was lost or changed
        assert _same(_weights(run / "checkpoints" / f"step_{s:07d}"), w)
    straight = train(small_config(tmp_path / "straight"))
    assert _same(_weights(run / "checkpoints" / "step_0000012"),
                 _weights(straight.run_dir / "checkpoints" / "step_0000012"))
    assert _metrics(run) == _metrics(straight.run_dir)


# ------------------------------------------------------------------------ config boundary errors
@pytest.mark.parametrize("override, message", [
    ("seed=4294967296", r"seed: expected an int in \[0, 2\*\*32 - 1\]"),
    ("process.options.beta_max=.inf", r"process VPSDE .*expected beta_max > 0 \(finite\), found inf"),
])
def test_config_values_that_failed_late_fail_at_the_boundary(tmp_path, override, message):
    cfg = training.apply_overrides(small_config(tmp_path / "run"), [override])
    with pytest.raises(ConfigError, match=message):
        prepare_run(cfg)


def test_yaml_config_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="to hold a mapping of sections .* found a list"):
        training.load_config(tmp_path / "list.yaml")
    import yaml

    cfg = small_config(tmp_path / "run")
    text = yaml.safe_dump(cfg).replace("learning_rate: 0.003", "learning_rate: 1e-3")
    assert "learning_rate: 1e-3" in text
    (tmp_path / "cfg.yaml").write_text(text)
    assert yaml.safe_load(text)["train"]["learning_rate"] == "1e-3"  # YAML 1.1 reads it as text
    assert training.load_config(tmp_path / "cfg.yaml").train.learning_rate == 1e-3
    with pytest.raises(ConfigError, match="train.learning_rate': expected float, found 'fast'"):
        training.load_config(tmp_path / "cfg.yaml", ["train.learning_rate=fast"])


def test_the_train_command_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    from score_toolkit.cli import main

    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(small_config(tmp_path / "run", train={"steps": 4})))
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if ".tmp-step_" in str(f):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    assert main(["train", "--config", str(cfg_file)]) == 1
    err = capsys.readouterr().err
    # log lines of the run may come first; the error itself is exactly one line, the last one
    errors = [line for line in err.splitlines() if line.startswith("score-toolkit train: error")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0]
    assert errors[0].startswith("score-toolkit train: error: OSError: ") and "no space left" in errors[0]
    assert "Traceback" not in err


def test_a_list_shaped_checkpoint_manifest_is_an_unusable_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(small_config(run, train={"steps": 8}))
    manifest = run / "checkpoints" / "step_0000008" / "MANIFEST.json"
    manifest.write_text("[1, 2]")
    ok, reason = verify_checkpoint(manifest.parent)
    assert not ok and "unreadable MANIFEST.json: expected an object with a 'files' object, found list" in reason
    manifest.write_text(json.dumps({"step": 8, "files": {"../../config.json": {"size": 1, "sha256": "x"}}}))
    ok, reason = verify_checkpoint(manifest.parent)
    assert not ok and "expected a path inside" in reason
    with pytest.warns(UserWarning, match="step_0000008 is unusable"):
        resumed = train(small_config(run), resume=True)
    assert resumed.resumed_from.name == "step_0000004"


# ------------------------------------------------------------------------ what is already in the run folder
def test_a_new_run_over_a_run_killed_before_its_first_checkpoint_starts_its_records_afresh(tmp_path):
    """The run folder of a run stopped before its first checkpoint holds config.json, metrics.jsonl and
    commands.txt, and nothing to resume: running the command again gives the records of one uninterrupted run
    (they were appended to: every logged step twice, both commands on the model card)."""
    run = tmp_path / "run"

    def crash(info):
        if info["step"] == 4:
            raise KeyboardInterrupt  # after the log of step 3, before the checkpoint of step 4

    with pytest.raises(KeyboardInterrupt):
        train(small_config(run, export={"command": "first try"}), callbacks=[crash])
    assert _metrics(run) and not list_checkpoints(run)
    with pytest.warns(UserWarning, match="records of an earlier run that has no checkpoint .*this new run replaces"):
        train(small_config(run, export={"command": "second try"}))
    straight = train(small_config(tmp_path / "straight"))
    assert _metrics(run) == _metrics(straight.run_dir)
    assert (run / "commands.txt").read_text() == "second try\n"


@pytest.mark.parametrize("name, content", [("metrics.jsonl", '{"step": 1, "my": "own log"}\n'),
                                           ("commands.txt", "my notes\n"),
                                           ("config.json", '{"learning_rate": 0.1}')])
def test_run_record_names_that_no_run_wrote_are_refused_not_replaced(tmp_path, name, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_text(content)
    with pytest.raises(ConfigError, match=f"holds {name}, files a training run writes, but no run config.json"):
        train(small_config(run))
    assert (run / name).read_text() == content and sorted(p.name for p in run.iterdir()) == [name]


@pytest.mark.parametrize("kind", ["link", "file"])
def test_checkpoint_names_that_are_not_the_writers_folders_are_never_used_or_moved(tmp_path, kind):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "MANIFEST.json").write_text("{}")
    entry = run / "checkpoints" / "step_0000004"
    if kind == "link":
        entry.symlink_to(archive, target_is_directory=True)
    else:
        entry.write_text("the user's file")
    assert list_checkpoints(run) == []
    with pytest.raises(ConfigError, match="step_0000004 under the checkpoint writer's names, but not as folders"):
        train(small_config(run))
    assert entry.is_symlink() == (kind == "link") and sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["step_0000004"]
    assert sorted(p.name for p in archive.iterdir()) == ["MANIFEST.json"]


def test_a_resume_after_a_cut_commands_line_records_its_command_on_its_own_line(tmp_path):
    run = tmp_path / "run"
    train(small_config(run, train={"steps": 4}, export={"command": "first"}))
    (run / "commands.txt").write_text("first\nscore-toolkit tr")  # a kill while the line was appended
    train(small_config(run, train={"steps": 8}, export={"command": "second"}), resume=True)
    assert (run / "commands.txt").read_text() == "first\nscore-toolkit tr\nsecond\n"


def _edit_checkpoint_state(folder: Path, **changes) -> None:
    """Change trainer_state.json of a checkpoint and its manifest entry (as a run with those values wrote it)."""
    from score_toolkit._io import sha256_file

    state_file = folder / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), **changes}, indent=2, sort_keys=True))
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    manifest["files"]["trainer_state.json"] = {"size": state_file.stat().st_size, "sha256": sha256_file(state_file)}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))


def test_a_resume_on_another_number_of_processes_warns_unless_the_noise_is_per_sample(tmp_path):
    for per_sample in (False, True):
        run = tmp_path / f"run{per_sample}"
        train(small_config(run, train={"steps": 4, "per_sample_noise": per_sample}))
        _edit_checkpoint_state(run / "checkpoints" / "step_0000004", num_processes=2)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            train(small_config(run, train={"steps": 8, "per_sample_noise": per_sample}), resume=True)
        said = [str(w.message) for w in seen if "resuming a run of 2 process(es) on 1" in str(w.message)]
        assert len(said) == (0 if per_sample else 1), said
        assert per_sample or "from step 5 on the noise differs" in said[0]


def test_a_resume_that_changes_the_learning_rate_schedule_warns(tmp_path):
    """train.steps may change on resume; a decaying schedule then spans the new length and its rate jumps."""
    for schedule, warned in (("cosine", True), ("constant_with_warmup", False)):
        run = tmp_path / schedule
        train(small_config(run, train={"steps": 8, "lr_scheduler": schedule, "warmup_steps": 2}))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            train(small_config(run, train={"steps": 12, "lr_scheduler": schedule, "warmup_steps": 2}), resume=True)
        said = [str(w.message) for w in seen if "learning-rate schedule changed" in str(w.message)]
        assert len(said) == int(warned), said
        assert not warned or "step 9 trains at" in said[0]


def test_a_second_run_in_a_folder_being_trained_in_is_refused_before_it_touches_anything(tmp_path):
    """A second run (e.g. a resubmitted job) used to resume from the first one's checkpoints while it still ran: it
    removed the first run's checkpoint being written (stale temporaries), and failed on a checkpoint the first one
    pruned (tried by hand: FileNotFoundError on checkpoints/step_0001400)."""
    import socket

    run = tmp_path / "run"
    seen = []
    train(small_config(run, train={"steps": 4}), callbacks=[lambda info: seen.append(
        json.loads((run / ".training.json").read_text()))])
    assert seen[0] == {"pid": os.getpid(), "host": socket.gethostname()} and not (run / ".training.json").exists()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands for a run in progress
    try:
        (run / ".training.json").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        (run / "checkpoints" / ".tmp-step_0000006").mkdir()  # its checkpoint being written
        with pytest.raises(ConfigError, match=f"is being trained in by process {other.pid} on this machine"):
            train(small_config(run, train={"steps": 8}), resume=True)
        assert (run / "checkpoints" / ".tmp-step_0000006").is_dir()
    finally:
        other.kill()
        other.wait()
    resumed = train(small_config(run, train={"steps": 8}), resume=True)  # its process is gone: a stale record
    assert resumed.step == 8 and not (run / ".training.json").exists()


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_run_that_stops_in_a_process_that_goes_on_frees_its_folder(tmp_path, stop):
    """Ctrl-C in a notebook, or an error: the interpreter lives on, and its run record must not block the folder."""
    run = tmp_path / "run"

    def interrupt(info):
        if info["step"] == 3:  # after the checkpoint of step 2
            raise stop("stopped at step 3")

    with pytest.raises(stop):
        train(small_config(run, train={"steps": 8, "checkpoint_every": 2}), callbacks=[interrupt])
    assert not (run / ".training.json").exists()
    resume = [sys.executable, "-c", "import sys, json; from score_toolkit.training import train; "
              "r = train(json.loads(sys.argv[1]), resume=True); print(r.step)",
              json.dumps(small_config(run, train={"steps": 4, "checkpoint_every": 2}))]
    done = subprocess.run(resume, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split()[-1] == "4", done.stderr[-2000:]


def test_a_run_started_after_the_checks_is_refused_when_the_folder_is_claimed(tmp_path, monkeypatch):
    """Two jobs started together both pass prepare_run's check; the second to claim the folder is refused."""
    import socket

    run = tmp_path / "run"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the job that claimed first
    prepare = training.loop.prepare_run

    def prepare_then_the_other_job_claims(*args, **kwargs):
        out = prepare(*args, **kwargs)
        (run / ".training.json").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        return out

    monkeypatch.setattr(training.loop, "prepare_run", prepare_then_the_other_job_claims)
    try:
        with pytest.raises(ConfigError, match=f"being trained in by process {other.pid}.*delete .training.json"):
            train(small_config(run, train={"steps": 2}))
        assert json.loads((run / ".training.json").read_text())["pid"] == other.pid  # its record is left alone
    finally:
        other.kill()
        other.wait()


def test_a_resume_whose_run_config_is_gone_says_it_cannot_check_the_config(tmp_path):
    run = tmp_path / "run"
    train(small_config(run, train={"steps": 4}))
    (run / "config.json").unlink()
    with pytest.warns(UserWarning, match="config.json is missing or not a run config: the config cannot be checked"):
        train(small_config(run, train={"steps": 8}), resume=True)
    (run / "config.json").write_text("not JSON")  # was a JSONDecodeError
    with pytest.warns(UserWarning, match="config.json is missing or not a run config"):
        train(small_config(run, train={"steps": 12}), resume=True)
