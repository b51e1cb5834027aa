"""The training loop: every objective learns, configs are validated before any work, checkpoints survive
crashes and resume exactly, two processes train the same model as one."""

from __future__ import annotations

import json
import os
import signal
import socket
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
from score_toolkit.training import ConfigError, RunConfig, latest_checkpoint, list_checkpoints, train, verify_checkpoint

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def small_config(out, **sections) -> dict:
    train_defaults = {"steps": 20, "batch_size": 64, "checkpoint_every": 5, "log_every": 5}
    return small_run_config(out, num_samples=2000, train_defaults=train_defaults, **sections)


# ------------------------------------------------------------------------------------ every objective learns
VE = {"name": "VESDE", "options": {"sigma_min": 0.05, "sigma_max": 5.0}}
SCORE_NET = {"name": "ScoreMLP", "prediction_type": "score", "time_input": "t",
             "options": {"hidden_dim": 32, "num_layers": 1}}
# the noise-free objectives learn the data score itself: a smoother ring keeps 60 steps enough
SOFT_RING = {"name": "ring", "options": {"num_samples": 2000, "std": 0.5, "radius": 2.0}}
OBJECTIVE_CASES = {
    "esm": dict(process=VE, model=SCORE_NET, data=SOFT_RING, objective={"name": "esm"}),
    "ism": dict(process=VE, model=SCORE_NET, data=SOFT_RING, objective={"name": "ism"}),
    "ssm": dict(process=VE, model=SCORE_NET, data=SOFT_RING, objective={"name": "ssm"}),
    "ssm_vr": dict(process=VE, model=SCORE_NET, data=SOFT_RING, objective={"name": "ssm_vr"}),
    "dsm": dict(process=VE, model=SCORE_NET, objective={"name": "dsm", "options": {"sigma": 0.5}}),
    "ncsn": dict(process=VE, model={**SCORE_NET, "time_input": "sigma"}, objective={"name": "ncsn"}),
    "continuous_dsm": dict(objective={"name": "continuous_dsm", "options": {"weighting": "likelihood"}}),
    "epsilon": dict(objective={"name": "epsilon"}),
    "continuous_dsm_energy": dict(model={"name": "EnergyMLP", "prediction_type": "energy", "time_input": "t",
                                         "options": {"hidden_dim": 32, "num_layers": 1, "time_embedding": "linear"}}),
}


@pytest.mark.parametrize("case", sorted(OBJECTIVE_CASES))
def test_every_objective_decreases_its_loss(tmp_path, case):
    cfg = small_config(tmp_path / "run", train={"steps": 60, "batch_size": 128, "log_every": 10,
                                                "checkpoint_every": 1000, "ema_decay": None},
                       **OBJECTIVE_CASES[case])
    result = train(cfg)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 6 and all(map(lambda v: v == v, losses))
    # the mean loss over the last 20 steps is clearly below the first 20 (an untrained network is far off)
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first - 0.1 * abs(first), (case, losses)


# ------------------------------------------------------------------------------------ config and validation
def test_config_files_and_overrides(tmp_path):
    import yaml

    cfg = small_config(tmp_path / "run")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    a = training.load_config(tmp_path / "c.yaml", ["train.steps=7", "model.options.hidden_dim=16",
                                                   "train.adam_betas=[0.8, 0.9]", "train.max_grad_norm=null"])
    b = training.load_config(tmp_path / "c.json")
    assert a.train.steps == 7 and b.train.steps == 20
    assert a.model.options["hidden_dim"] == 16 and a.train.adam_betas == [0.8, 0.9] and a.train.max_grad_norm is None
    assert RunConfig.from_dict(a.to_dict()) == a
    assert isinstance(a.train.learning_rate, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", r"unknown config key 'train.stepz' \(did you mean 'train.steps'\?\)"),
        ("train.steps=many", r"config key 'train.steps': expected int, found 'many'"),
        ("train.progress=3", r"expected bool"),
        ("trian.steps=3", r"unknown config key 'trian'"),
        ("train=3", r"expected train. to be a mapping|expected train to be a mapping"),
        ("noequals", r"expected an override KEY=VALUE"),
    ],
)
def test_bad_config_keys_and_types(tmp_path, override, message):
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(small_config(tmp_path / "run")))
    with pytest.raises(ConfigError, match=message):
        training.load_config(tmp_path / "c.yaml", [override])


BAD_CONFIGS = {
    "unknown objective": (dict(objective={"name": "dsn"}), r"unknown objective 'dsn'. Did you mean 'dsm'"),
    "unknown dataset": (dict(data={"name": "rnig", "options": {}}), r"unknown dataset 'rnig'. Did you mean 'ring'"),
    "unknown model": (dict(model={"name": "ScoreMLPP"}), r"unknown model 'ScoreMLPP'"),
    "unknown process": (dict(process={"name": "VP"}), r"unknown process 'VP'"),
    "energy net with epsilon": (dict(model={"name": "EnergyMLP", "prediction_type": "epsilon"}),
                                r"EnergyMLP with prediction_type 'epsilon'"),
    "energy prediction with ScoreMLP": (dict(model={"name": "ScoreMLP", "prediction_type": "energy"}),
                                        r"needs an EnergyMLP"),
    "ncsn on VP": (dict(objective={"name": "ncsn"}), r"'ncsn' .* needs a variance-exploding process"),
    "esm without a known score": (dict(data={"name": "moons", "options": {}}, objective={"name": "esm"}),
                                  r"'esm' needs the data's exact score"),
    "dsm without sigma": (dict(process=VE, objective={"name": "dsm"}), r"needs objective.options.sigma"),
    "wrong dim": (dict(model={"name": "ScoreMLP", "options": {"dim": 3}}), r"dim = 3 but the data have 2"),
    "unet on points": (dict(model={"name": "UNet2DModel"}), r"UNet2DModel needs square images"),
    "log embedding at index 0": (
        dict(process={"name": "DiscreteVP", "options": {"num_train_timesteps": 10}},
             model={"name": "ScoreMLP", "time_input": "index", "options": {"hidden_dim": 8}}),
        r"cannot be evaluated .* at t = 0.1 with time_input 'index' \(network time 0\)"),
    "unknown objective option": (dict(objective={"name": "continuous_dsm", "options": {"weigthing": "x"}}),
                                 r"objective continuous_dsm: .*weigthing"),
    "objective process set by hand": (dict(objective={"name": "epsilon", "options": {"process": 1}}),
                                      r"objective.options.process is set by the trainer"),
    "bad mixed precision": (dict(train={"mixed_precision": "fp8"}), r"train.mixed_precision"),
    "bad ema": (dict(train={"ema_decay": 1.5}), r"train.ema_decay"),
    "no output dir": (dict(output_dir=None), r"output_dir: expected the folder"),
    "unknown sampler for export": (dict(export={"enabled": True, "sampler": "nope"}), r"export.sampler"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_inconsistent_configs_fail_before_any_work(tmp_path, case):
    sections, message = BAD_CONFIGS[case]
    cfg = small_config(tmp_path / "run", **sections)
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unwritable_output_dir(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="output_dir .*afile/run: cannot create it"):
        train(small_config(tmp_path / "afile" / "run"))
    # the export folder is checked before the training too, not when the trained model is written
    with pytest.raises(ConfigError, match="export folder .*afile/out: cannot create the folder it goes in"):
        train(small_config(tmp_path / "run", export={"enabled": True, "folder": str(tmp_path / "afile" / "out")}))
    with pytest.raises(ConfigError, match="export folder .*afile exists and is not a folder"):
        train(small_config(tmp_path / "run", export={"enabled": True, "folder": str(tmp_path / "afile"),
                                                       "overwrite": True}))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_batch_must_divide(tmp_path):
    with pytest.raises(ConfigError, match="batch_size = 30 .* must divide by .* 1 x 4"):
        train(small_config(tmp_path / "run", train={"batch_size": 30, "gradient_accumulation_steps": 4}))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot resume: the run folder .* does not exist"):
        train(small_config(tmp_path / "none"), resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        train(small_config(tmp_path / "empty"), resume=True)
    train(small_config(tmp_path / "run", train={"steps": 5}))
    with pytest.raises(ConfigError, match="already holds checkpoints .* pass --resume"):
        train(small_config(tmp_path / "run", train={"steps": 5}))
    with pytest.raises(ConfigError, match="(?s)config differs .*train.learning_rate: run has 0.003, config has 0.1"):
        train(small_config(tmp_path / "run", train={"steps": 10, "learning_rate": 0.1}), resume=True)
    with pytest.raises(ConfigError, match="checkpoint is at step 5, past train.steps = 3"):
        train(small_config(tmp_path / "run", train={"steps": 3}), resume=True)


def test_fp16_on_cpu_warns_and_trains_in_float32(tmp_path):
    with pytest.warns(UserWarning, match="fp16' has no effect on CPU") as rec:
        result = train(small_config(tmp_path / "run", train={"steps": 2, "mixed_precision": "fp16"}))
    assert {w.filename for w in rec if "fp16" in str(w.message)} == {__file__}  # names the caller's line
    assert result.step == 2


def test_bf16_gradient_accumulation_warmup_and_clipping(tmp_path):
    cfg = small_config(tmp_path / "run", train={"steps": 10, "mixed_precision": "bf16", "gradient_accumulation_steps": 2,
                                                "warmup_steps": 4, "max_grad_norm": 0.5, "log_every": 1,
                                                "checkpoint_every": 100})
    result = train(cfg)
    lrs = [h["lr"] for h in result.history]
    assert lrs[:5] == pytest.approx([3e-3 * k / 4 for k in (1, 2, 3, 4)] + [3e-3])
    assert all(h["loss"] == h["loss"] for h in result.history)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())


def test_accumulation_equals_a_larger_batch(tmp_path):
    """2 micro-batches of 32 accumulate to the gradient of one batch of 64 (same samples, same noise), so the
    models agree up to float summation order. Adam divides each gradient entry by its own RMS, so an entry
    whose gradient is ~0 can move by a sizeable fraction of the learning rate on a round-off difference:
    the tolerance is 1% of lr (measured: 1.1e-5 with lr = 3e-3, in one entry of the time MLP)."""
    common = {"steps": 3, "ema_decay": None, "per_sample_noise": True, "checkpoint_every": 100}
    a = train(small_config(tmp_path / "a", train=common))
    b = train(small_config(tmp_path / "b", train={**common, "gradient_accumulation_steps": 2}))
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert float((p - q).detach().abs().max()) < 1e-2 * 3e-3, n


def test_same_seed_same_model(tmp_path):
    a = train(small_config(tmp_path / "a", train={"steps": 5}))
    b = train(small_config(tmp_path / "b", train={"steps": 5}))
    c = train(small_config(tmp_path / "c", seed=1, train={"steps": 5}))
    pa, pb, pc = (torch.cat([p.flatten() for p in r.model.parameters()]) for r in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_a_single_process_logs_plain_messages(tmp_path, caplog):
    caplog.set_level("INFO", logger="score_toolkit.training.loop")
    train(small_config(tmp_path / "a", train={"steps": 2, "checkpoint_every": 2, "log_every": 2}))
    started = [r.getMessage() for r in caplog.records if "steps from step" in r.getMessage()]
    assert started and started[0].startswith("training 2 steps from step 0 on 1 process(es)"), started


def test_ema_matches_its_definition():
    net = torch.nn.Linear(3, 2)
    ema = training.EMA(net, 0.9)
    start = [p.detach().clone() for p in net.parameters()]
    shadow = [s.clone() for s in start]
    for k in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * (k + 1))
        d = min(0.9, (1 + k) / (10 + k))
        shadow = [d * s + (1 - d) * p.detach() for s, p in zip(shadow, net.parameters())]
        ema.update(net)
    for s, e in zip(shadow, ema.shadow):
        assert torch.allclose(s, e, atol=1e-5)
    copy = torch.nn.Linear(3, 2)
    ema.copy_to(copy)
    assert torch.allclose(copy.weight, shadow[0], atol=1e-5)


def test_ema_decays_against_diffusers_ema_model():
    """The documented relation to diffusers' EMAModel: decay 0.1 vs 0 at the first update, equal decays after,
    so the shadow weights differ exactly by the first update's share of the initial weights."""
    from diffusers.training_utils import EMAModel

    net = torch.nn.Linear(3, 2)
    ours, theirs = training.EMA(net, 0.99), EMAModel(net.parameters(), decay=0.99)
    decays = []
    for k in range(3):  # few updates: the difference (0.1 * product of later decays) stays far above float32 noise
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * (k + 1))
        decays.append((ours.current_decay(), theirs.get_decay(theirs.optimization_step + 1)))
        ours.update(net)
        theirs.step(net.parameters())
    assert decays[0] == (0.1, 0.0)
    assert all(a == pytest.approx(b, rel=1e-15) for a, b in decays[1:])
    rest = 1.0
    for _, d in decays[1:]:
        rest *= d
    w0 = [p.detach() - 0.1 * sum(range(1, 4)) for p in net.parameters()]  # the initial weights
    first = [p0 + 0.1 for p0 in w0]  # the weights at the first update
    for s, t, a, b in zip(ours.shadow, theirs.shadow_params, w0, first):
        torch.testing.assert_close(s - t, 0.1 * rest * (a - b), rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------------------------ checkpoints and resume
def _ckpt_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
    out.update({f"ema.{k}": v for k, v in load_file(str(folder / "ema.safetensors")).items()})
    opt = torch.load(folder / "optimizer.bin", weights_only=False)  # our own run folder's file
    for pid, st in opt["state"].items():
        for k, v in st.items():
            out[f"opt.{pid}.{k}"] = torch.as_tensor(v)
    return out


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = _ckpt_tensors(a), _ckpt_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    sa = json.loads((a / "trainer_state.json").read_text())
    sb = json.loads((b / "trainer_state.json").read_text())
    assert sa == sb


class _Crash(RuntimeError):
    pass


def _crash_at(step):
    def cb(info):
        if info["step"] == step:
            raise _Crash(f"simulated crash at step {step}")

    return cb


def test_checkpoints_are_complete_and_pruned(tmp_path):
    result = train(small_config(tmp_path / "run", train={"keep_checkpoints": 2}))
    ckpts = list_checkpoints(result.run_dir)
    assert [s for s, _ in ckpts] == [15, 20]
    for _, folder in ckpts:
        assert verify_checkpoint(folder) == (True, "ok")
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        assert set(manifest["files"]) == {"model.safetensors", "optimizer.bin", "random_states_0.pkl",
                                          "ema.safetensors", "trainer_state.json"}
    assert not [p for p in (result.run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resume_after_a_crash_reproduces_the_straight_run(tmp_path):
    straight = train(small_config(tmp_path / "straight"))
    with pytest.raises(_Crash):
        train(small_config(tmp_path / "crashed"), callbacks=[_crash_at(13)])
    # a crash between checkpoints loses only the steps since the last one
    assert [s for s, _ in list_checkpoints(tmp_path / "crashed")] == [5, 10]
    resumed = train(small_config(tmp_path / "crashed"), resume=True)
    assert resumed.resumed_from.name == "step_0000010"
    assert [h["step"] for h in resumed.history] == [15, 20]
    # identical data order, noise, optimizer state and EMA: bit-identical weights
    _assert_same_checkpoint(straight.run_dir / "checkpoints" / "step_0000020",
                            resumed.run_dir / "checkpoints" / "step_0000020")
    straight_log = [json.loads(line) for line in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in straight_log] == [(r["step"], r["loss"]) for r in resumed_log]


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    straight = train(small_config(tmp_path / "run"))
    final = straight.run_dir / "checkpoints" / "step_0000020"
    reference = {k: v.clone() for k, v in _ckpt_tensors(final).items()}
    weights = final / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    ok, reason = verify_checkpoint(final)
    assert not ok and "truncated" in reason
    with pytest.warns(UserWarning, match="step_0000020 is unusable .*truncated"):
        assert latest_checkpoint(straight.run_dir).name == "step_0000015"
    with pytest.warns(UserWarning, match="unusable"):
        resumed = train(small_config(tmp_path / "run"), resume=True)
    assert resumed.resumed_from.name == "step_0000015"
    again = _ckpt_tensors(final)
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    # a corrupted (same size) file is caught by the hash
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert verify_checkpoint(final) == (False, "file model.safetensors does not match its sha256 in the manifest (corrupt)")


@pytest.mark.parametrize("where", ["before_rename", "while_hashing"])
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, where):
    calls = {"n": 0}
    if where == "before_rename":
        real = training.checkpoints.fsync_dir

        def fsync_dir(path):
            if Path(path).name == ".tmp-step_0000010":
                raise _Crash("killed after writing the manifest, before the rename")
            real(path)

        monkeypatch.setattr(training.checkpoints, "fsync_dir", fsync_dir)
    else:
        real_hash = training.checkpoints.sha256_file

        def sha(path):
            calls["n"] += 1
            if calls["n"] == 8:  # in the middle of the second checkpoint's files
                raise _Crash("killed while hashing")
            return real_hash(path)

        monkeypatch.setattr(training.checkpoints, "sha256_file", sha)
    with pytest.raises(_Crash):
        train(small_config(tmp_path / "run"))
    monkeypatch.undo()
    root = tmp_path / "run" / "checkpoints"
    assert not (root / ".tmp-step_0000010").exists()  # a failed write leaves no residue
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [5]
    assert verify_checkpoint(root / "step_0000005") == (True, "ok")
    resumed = train(small_config(tmp_path / "run"), resume=True)
    assert resumed.resumed_from.name == "step_0000005" and resumed.step == 20
    assert not (root / ".tmp-step_0000010").exists()


@pytest.mark.slow
def test_kill_9_while_writing_a_checkpoint(tmp_path):
    """A real SIGKILL in the middle of the second checkpoint's write (after some files were fsynced)."""
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(small_config(tmp_path / "run", train={"steps": 12})))
    script = textwrap.dedent(f"""
        import os, signal
        import torch
        torch.set_num_threads(1)
        from score_toolkit import training
        real = training.checkpoints._fsync_file
        count = {{"n": 0}}
        def fsync_file(path):
            real(path)
            if ".tmp-step_0000010" in str(path):
                count["n"] += 1
                if count["n"] == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
        training.checkpoints._fsync_file = fsync_file
        training.train(training.load_config({str(cfg_file)!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = tmp_path / "run" / "checkpoints"
    assert (root / ".tmp-step_0000010").is_dir()
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [5]
    assert verify_checkpoint(root / "step_0000005") == (True, "ok")
    resumed = train(training.load_config(cfg_file), resume=True)
    assert resumed.resumed_from.name == "step_0000005" and resumed.step == 12
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [5, 10, 12]


# ------------------------------------------------------------------------------------ two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_the_same_model_as_one(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 with the CPU flag: two real processes (gloo), each
    with half of every global batch. With per-sample noise both runs see identical samples and noise, so
    the models agree up to float summation order; the tolerance is 1% of the learning rate, as in
    test_accumulation_equals_a_larger_batch (Adam's per-entry normalisation)."""
    common = {"train": {"steps": 10, "batch_size": 64, "per_sample_noise": True, "cpu": True, "checkpoint_every": 10}}
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(small_config(tmp_path / "two", **common)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "score_toolkit.cli", "train", "--config", str(cfg_file)]  # the documented command
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = tmp_path / "two" / "checkpoints" / "step_0000010"
    # the launcher's command is the one recorded (for the model card)
    recorded = (tmp_path / "two" / "commands.txt").read_text()
    assert recorded.startswith("python -m accelerate.commands.launch --multi_gpu --num_processes 2 "), recorded
    assert recorded.endswith(f"-m score_toolkit.cli train --config {cfg_file}\n"), recorded
    state = json.loads((two / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert (two / "random_states_0.pkl").is_file() and (two / "random_states_1.pkl").is_file()

    one = train(small_config(tmp_path / "one", **{"train": {**common["train"], "cpu": False}}))
    a = load_file(str(two / "model.safetensors"))
    b = load_file(str(one.run_dir / "checkpoints" / "step_0000010" / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-2 * 3e-3, diff
    # the two-process run really changed the weights (it is not comparing two initialisations)
    init = training.components._build_model(RunConfig.from_dict(small_config(tmp_path)).model, (2,))
    moved = max(float((a[k] - v).abs().max()) for k, v in init.state_dict().items() if k in a)
    assert moved > 1e-3


# ------------------------------------------------------------------------------------ the command line
def test_cli_train_dry_run_and_run(tmp_path, capsys):
    import yaml

    from score_toolkit import cli
    from score_toolkit.cli import train as cli_train

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(small_config(tmp_path / "run")))
    assert cli_train.main(["--config", str(tmp_path / "c.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "ok: ring of 8 Gaussians" in out and not (tmp_path / "run" / "checkpoints").exists()
    assert cli_train.main(["--config", str(tmp_path / "c.yaml"), "--set", "objective.name=esn"]) == 2
    assert "unknown objective 'esn'. Did you mean 'esm'" in capsys.readouterr().err
    # through score_toolkit.cli (the train command is registered there)
    commands = list(cli.COMMANDS)
    if cli_train.add_train_parser not in commands:
        commands.append(cli_train.add_train_parser)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "COMMANDS", commands)
        code = cli.main(["train", "--config", str(tmp_path / "c.yaml"), "--set", "train.steps=4",
                         "--output-dir", str(tmp_path / "run2")])
    assert code == 0
    assert [s for s, _ in list_checkpoints(tmp_path / "run2")] == [4]
    saved = json.loads((tmp_path / "run2" / "config.json").read_text())
    assert saved["export"]["command"] == (f"score-toolkit train --config {tmp_path / 'c.yaml'} --set train.steps=4 "
                                          f"--output-dir {tmp_path / 'run2'}")
    assert saved["train"]["steps"] == 4
    assert (tmp_path / "run2" / "commands.txt").read_text() == saved["export"]["command"] + "\n"


def test_the_command_is_recorded_as_invoked(monkeypatch):
    from score_toolkit.cli import train as cli_train

    record = cli_train._command_line
    # called from Python with explicit arguments: the equivalent command
    assert record(["train", "--config", "a b.yaml"], parent=None) == "score-toolkit train --config 'a b.yaml'"
    # this interpreter's own command line, named as it was started
    for argv0, prog in (("/venv/bin/score-toolkit", "score-toolkit"),
                        ("/src/score_toolkit/cli/__main__.py", "python -m score_toolkit.cli")):
        monkeypatch.setattr(sys, "argv", [argv0, "train", "--config", "c.yaml"])
        assert record(None, parent=None) == f"{prog} train --config c.yaml"
    # under a launcher, the launcher's command line (the parent process's) is what was run
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m", "score_toolkit.cli", "train",
              "--config", "c.yaml"]
    for parent in (["/usr/bin/accelerate", *launch[1:]], ["/usr/bin/python3.11", "/usr/bin/accelerate", *launch[1:]]):
        assert record(["ignored"], parent=parent) == " ".join(launch)
    assert record(None, parent=["/usr/bin/python3", "-m", "accelerate.commands.launch", "--num_processes", "1",
                                "-m", "score_toolkit.cli", "train"]) == \
        "python -m accelerate.commands.launch --num_processes 1 -m score_toolkit.cli train"
    assert record(None, parent=["/opt/bin/torchrun", "--nproc_per_node", "2", "-m", "score_toolkit.cli", "train"]) == \
        "torchrun --nproc_per_node 2 -m score_toolkit.cli train"
    # a shell or a test runner is not a launcher
    monkeypatch.setattr(sys, "argv", ["/venv/bin/score-toolkit", "train", "--config", "c.yaml"])
    for parent in (["-bash"], ["/usr/bin/python3", "-m", "pytest", "-q"], ["/usr/bin/python3", "/usr/bin/accelerate", "env"]):
        assert record(None, parent=parent) == "score-toolkit train --config c.yaml"


@pytest.mark.slow  # a fresh interpreter: about 10 s
def test_console_script_records_its_own_command(tmp_path):
    import sysconfig

    import yaml

    script = Path(sysconfig.get_path("scripts")) / "score-toolkit"
    assert script.exists(), f"console script not installed at {script}: pip install -e ."
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(small_config("run", train={"steps": 2})))
    proc = subprocess.run([str(script), "train", "--config", "c.yaml", "--set", "train.checkpoint_every=2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "commands.txt").read_text() == \
        "score-toolkit train --config c.yaml --set train.checkpoint_every=2\n"


def test_no_warnings_in_a_plain_run(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train(small_config(tmp_path / "run", train={"steps": 3}))


def test_tensorboard_logging_or_a_clear_error(tmp_path):
    import importlib.util

    cfg = small_config(tmp_path / "run", train={"steps": 2, "log_every": 1, "log_with": "tensorboard"})
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match=r"needs the tensorboard package: pip install 'score-toolkit\[tensorboard\]'"):
            train(cfg)
        assert not (tmp_path / "run" / "checkpoints").exists()
    else:
        train(cfg)
        assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run" / "logs").rglob("*"))


# ------------------------------------------------------------------------------------ the throughput benchmark
def test_training_benchmark_runs_and_writes_its_table(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_training.py"
    spec = importlib.util.spec_from_file_location("bench_training_smoke", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "training.md"
    assert bench.main(["--steps", "8", "--warmup", "2", "--repeats", "1", "--out", str(out)]) == 0
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith(("| minimal", "| full"))]
    assert [(r[0], r[1]) for r in rows] == [("| minimal", "wall"), ("| minimal", "CPU"), ("| full", "wall"), ("| full", "CPU")]
    for r in rows:
        hand, ours, ratio = float(r[2]), float(r[3]), float(r[4])
        # the table rounds steps/s to 0.1; the ratio is computed before rounding
        assert hand > 0 and ours > 0 and ratio == pytest.approx(ours / hand, rel=0.02)
