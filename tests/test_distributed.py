"""Sampling to a folder: the same samples bit for bit for any batch size and for 1 or 2 processes (a real
two-process ``accelerate launch``), shards that a re-run skips, the ``sample`` command, and bad input that
fails before anything is written and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from helpers import fail_shard, tiny_unet
from PIL import Image

from score_toolkit import distributed
from score_toolkit._utils import per_sample_generators
from score_toolkit.cli import main as cli_main
from score_toolkit.distributed import MANIFEST_NAME, PICTURE_NAME, SAMPLES_NAME, load_samples, sample_to_folder
from score_toolkit.models import ScoreMLP
from score_toolkit.pipeline import DEFAULT_SAMPLER, SHIPPED_MODELS_ENV_VAR, ScorePipeline
from score_toolkit.processes import VPSDE
from score_toolkit.schedulers import scheduler_for


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "digits"
    ScorePipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100, beta_end=0.2)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def vector_pipeline():
    torch.manual_seed(0)
    return ScorePipeline(unet=ScoreMLP(2, hidden_dim=16, num_layers=1).eval(), scheduler=scheduler_for(VPSDE(), "epsilon", "t"))


SETTINGS = dict(sampler="euler_maruyama", sampler_options={"num_steps": 4}, seed=7, network_batch_size=4, progress=False)


# ------------------------------------------------------------------------------------ one process
def test_writes_samples_picture_and_manifest(tmp_path, image_folder, accelerator):
    pipe = ScorePipeline.from_pretrained(image_folder)
    result = sample_to_folder(pipe, tmp_path / "out", 6, batch_size=4, accelerator=accelerator, **SETTINGS)
    samples = load_samples(tmp_path / "out")
    # the run is defined sample by sample: sample i is the pipeline's output with generator (seed, i)
    direct = pipe(batch_size=6, sampler="euler_maruyama", num_steps=4, generator=per_sample_generators(7, range(6)),
                  output_type="pt", network_batch_size=4).samples
    assert torch.equal(samples, direct)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([MANIFEST_NAME, PICTURE_NAME, SAMPLES_NAME])
    assert Image.open(result.picture).size[0] > 8 * 6
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["run"]["sampler"] == "euler_maruyama"
    assert result.num_samples == 6 and result.shards_written == 1 and result.nfe_per_batch == [4, 4]


def test_default_sampler_is_the_pipelines(tmp_path, accelerator):
    """With no sampler given, a folder run samples as ``ScorePipeline`` does by default (its sampler and steps)."""
    pipe = vector_pipeline()
    sample_to_folder(pipe, tmp_path / "out", 3, batch_size=3, accelerator=accelerator, seed=2, network_batch_size=3,
                     progress=False)
    run = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["run"]
    default = pipe.make_sampler(DEFAULT_SAMPLER)
    assert run["sampler"] == DEFAULT_SAMPLER and run["num_steps"] == default.config["num_steps"]
    direct = pipe(batch_size=3, generator=per_sample_generators(2, range(3)), output_type="pt",
                  network_batch_size=3).samples
    torch.testing.assert_close(load_samples(tmp_path / "out"), direct, rtol=0, atol=0)


def test_same_samples_for_any_batch_size(tmp_path, image_folder, accelerator):
    pipe = ScorePipeline.from_pretrained(image_folder)
    runs = []
    for batch, shard in ((1, 3), (2, 4), (5, 5)):
        sample_to_folder(pipe, tmp_path / f"b{batch}", 7, batch_size=batch, shard_size=shard, accelerator=accelerator,
                         **SETTINGS)
        runs.append(load_samples(tmp_path / f"b{batch}"))
    assert all(torch.equal(r, runs[0]) for r in runs[1:])


def test_two_dimensional_data_gets_a_scatter_picture(tmp_path, accelerator):
    result = sample_to_folder(vector_pipeline(), tmp_path / "v", 50, batch_size=25, accelerator=accelerator, **SETTINGS)
    assert load_samples(result.samples_file).shape == (50, 2)
    width, height = Image.open(result.picture).size
    assert width > 2 * height * 0.8  # scatter next to histogram


def test_shards_are_written_and_a_rerun_skips_the_complete_ones(tmp_path, image_folder, accelerator, monkeypatch):
    pipe = ScorePipeline.from_pretrained(image_folder)
    out = tmp_path / "run"
    original = fail_shard(monkeypatch, 2)
    with pytest.raises(OSError, match="No space left"):
        sample_to_folder(pipe, out, 7, batch_size=2, shard_size=2, accelerator=accelerator, **SETTINGS)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert sorted(manifest["shards"]) == ["0", "1"] and not manifest["complete"]
    assert not (out / SAMPLES_NAME).exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(distributed, "write_shard", original)
    calls = []
    monkeypatch.setattr(ScorePipeline, "__call__", _counting(ScorePipeline.__call__, calls))
    resumed = sample_to_folder(pipe, out, 7, batch_size=2, shard_size=2, accelerator=accelerator, **SETTINGS)
    assert (resumed.shards_skipped, resumed.shards_written) == (2, 2) and len(calls) == 2
    assert not (out / "shards").exists()  # merged into samples.safetensors
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["shards"] == {} and sorted(manifest["merged_shards"]) == ["0", "1", "2", "3"]
    assert "file" not in json.dumps(manifest["merged_shards"])  # no record of a deleted file
    clean = sample_to_folder(pipe, tmp_path / "clean", 7, batch_size=2, shard_size=2, accelerator=accelerator, **SETTINGS)
    assert torch.equal(load_samples(out), load_samples(clean.samples_file))
    again = sample_to_folder(pipe, out, 7, batch_size=2, shard_size=2, accelerator=accelerator, **SETTINGS)
    assert (again.shards_skipped, again.shards_written) == (4, 0) and len(calls) == 2 + 4


def _counting(fn, calls):
    def wrapper(self, *args, **kwargs):
        calls.append(1)
        return fn(self, *args, **kwargs)

    return wrapper


def test_another_run_in_the_same_folder_is_refused_unless_overwrite(tmp_path, accelerator):
    pipe = vector_pipeline()
    sample_to_folder(pipe, tmp_path / "o", 4, batch_size=2, accelerator=accelerator, **SETTINGS)
    changed = {**SETTINGS, "seed": 8}
    with pytest.raises(ValueError, match="holds another sampling run.*seed: 7 -> 8"):
        sample_to_folder(pipe, tmp_path / "o", 4, batch_size=2, accelerator=accelerator, **changed)
    before = load_samples(tmp_path / "o")
    sample_to_folder(pipe, tmp_path / "o", 4, batch_size=2, accelerator=accelerator, overwrite=True, **changed)
    assert not torch.equal(before, load_samples(tmp_path / "o"))


@pytest.mark.parametrize("where", ["a_file", "under_a_file"])
def test_an_output_folder_that_cannot_be_written(tmp_path, accelerator, where):
    (tmp_path / "f").write_text("x")
    target = tmp_path / "f" if where == "a_file" else tmp_path / "f" / "sub"
    with pytest.raises(OSError, match=f"{target}"):
        sample_to_folder(vector_pipeline(), target, 4, batch_size=2, accelerator=accelerator, **SETTINGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_bad_arguments_fail_before_anything_is_written(tmp_path, accelerator):
    pipe = vector_pipeline()
    bad = [
        ({"sampler": "eular_maruyama"}, ValueError, "(?i)did you mean 'euler_maruyama'"),
        ({"sampler_options": {"num_step": 3}}, TypeError, "did you mean 'num_steps'"),
        ({"shard_size": 3}, ValueError, "multiple of batch_size"),
        ({"seed": -1}, ValueError, "seed"),
        # a truthy string was taken as True: overwrite="no" replaced another run's files
        ({"overwrite": "no"}, TypeError, "expected overwrite to be a bool, found 'no'"),
        ({"progress": "no"}, TypeError, "expected progress to be a bool, found 'no'"),
        ({"image_files": 1}, TypeError, "expected image_files to be a bool, found 1"),
        ({"checkpoint": 3}, TypeError, r"expected checkpoint to be a name or path \(str\) or None, found int"),
    ]
    for change, error, match in bad:
        with pytest.raises(error, match=match):
            sample_to_folder(pipe, tmp_path / "x", 4, **{**SETTINGS, "batch_size": 2, "accelerator": accelerator, **change})
        assert not (tmp_path / "x").exists()


def test_a_failure_during_the_first_run_leaves_no_folder(tmp_path, accelerator, monkeypatch):
    def boom(self, *args, **kwargs):
        raise FloatingPointError("state became NaN (simulated)")

    monkeypatch.setattr(ScorePipeline, "__call__", boom)
    with pytest.raises(FloatingPointError):
        sample_to_folder(vector_pipeline(), tmp_path / "new", 4, batch_size=2, accelerator=accelerator, **SETTINGS)
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------ the command
def test_sample_command_defaults_to_the_shipped_digits_model(tmp_path, image_folder, monkeypatch, capsys):
    monkeypatch.setenv(SHIPPED_MODELS_ENV_VAR, str(image_folder.parent))
    out = tmp_path / "grid"
    code = cli_main(["sample", "--num-samples", "4", "--steps", "3", "--batch-size", "2", "--output-dir", str(out),
                     "--no-progress", "--cpu"])
    assert code == 0, capsys.readouterr().err
    assert (out / PICTURE_NAME).is_file() and load_samples(out).shape == (4, 1, 8, 8)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["run"]["checkpoint"] == str(image_folder) and manifest["run"]["sampler"] == DEFAULT_SAMPLER
    assert f"wrote 4 samples with {DEFAULT_SAMPLER} (num_steps=3)" in capsys.readouterr().out


def test_sample_command_errors(tmp_path, image_folder, monkeypatch, capsys):
    monkeypatch.setenv(SHIPPED_MODELS_ENV_VAR, str(tmp_path / "nowhere"))
    out = tmp_path / "o"
    base = ["sample", "--output-dir", str(out), "--no-progress", "--num-samples", "2", "--steps", "2"]
    assert cli_main(base) == 2
    assert "shipped 'digits' model is not at" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    shutil.copytree(image_folder, corrupt)
    weights = corrupt / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    unmappable = tmp_path / "unmappable"
    shutil.copytree(image_folder, unmappable)
    sched = unmappable / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "rescale_betas_zero_snr": True}))
    cases = [
        ([str(image_folder), "--sampler", "ancestrall"], "did you mean 'ancestral'"),
        ([str(image_folder), "--option", "gird=uniform"], "did you mean 'grid'"),
        ([str(image_folder), "--option", "grid"], "KEY=VALUE"),
        ([str(tmp_path)], "not a pipeline folder: expected model_index.json"),
        ([str(corrupt)], "diffusion_pytorch_model.safetensors"),
        ([str(unmappable)], "rescale_betas_zero_snr"),
    ]
    for extra, message in cases:
        assert cli_main(base + extra) == 2, extra
        assert message.lower() in capsys.readouterr().err.lower(), extra
        assert not out.exists(), extra


# ------------------------------------------------------------------------------------ two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_samples_of_one_bit_for_bit(tmp_path, image_folder, accelerator):
    """A real two-process CPU run (``accelerate launch --multi_gpu --num_processes 2`` with ``--cpu``; note that
    ``accelerate launch --cpu --num_processes 2`` would silently start one process)."""
    launcher = shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate launcher is not on PATH")
    out2 = tmp_path / "two"
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "score_toolkit.cli", "sample",
           str(image_folder), "--num-samples", "10", "--batch-size", "3", "--sampler", "predictor_corrector", "--steps",
           "4", "--option", "snr_rule=batch", "--seed", "7", "--network-batch-size", "4", "--output-dir", str(out2),
           "--no-progress", "--cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 process(es)" in run.stdout
    manifest = json.loads((out2 / MANIFEST_NAME).read_text())
    ranks = manifest["merged_shards"]["0"]["samples_per_rank"]
    assert manifest["merged_shards"]["0"]["num_processes"] == 2 and ranks == {"0": 6, "1": 4}  # both ranks drew blocks
    assert manifest["shards"] == {} and not (out2 / "shards").exists()  # no record points at a merged shard file
    pipe = ScorePipeline.from_pretrained(image_folder)
    # a sampler that couples the samples of a batch (batch-averaged corrector steps): blocks of batch_size indices
    # are drawn together whatever process draws them, so even this one gives the same samples
    coupled = {**SETTINGS, "sampler": "predictor_corrector", "sampler_options": {"num_steps": 4, "snr_rule": "batch"}}
    one = sample_to_folder(pipe, tmp_path / "one", 10, batch_size=3, accelerator=accelerator, **coupled)
    assert torch.equal(load_samples(out2), load_samples(one.samples_file))


@pytest.mark.slow
def test_the_shipped_digits_model_samples_quickly(tmp_path, capsys):
    """The main job: ``score-toolkit sample`` with no checkpoint, on the real shipped model (CPU time measured,
    since wall time on a shared machine says little)."""
    from score_toolkit.pipeline import shipped_model_path

    try:
        shipped_model_path("digits")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    import time

    start = time.process_time()
    assert cli_main(["sample", "--output-dir", str(tmp_path / "d"), "--no-progress", "--cpu"]) == 0
    cpu = time.process_time() - start
    assert load_samples(tmp_path / "d").shape == (64, 1, 8, 8) and (tmp_path / "d" / PICTURE_NAME).is_file()
    assert cpu < 60, f"sampling the digits took {cpu:.1f} s of CPU"

