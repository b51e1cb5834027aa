"""Nothing lost, nothing silently wrong: files the tool did not write survive, manifests cannot point outside
their folder, per-sample seeds never collide, configs and weights are read strictly, untrusted configs cannot
make loading allocate more than the weight file holds, and bad input at the public boundaries is a clear error
(what was expected, what was found)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from helpers import fail_shard, vector_pipeline
from safetensors.torch import load_file, save_file

from score_toolkit import distributed, hub
from score_toolkit._utils import per_sample_generators, sample_seed
from score_toolkit.data import load_vectors
from score_toolkit.distributed import MANIFEST_NAME, load_samples, sample_to_folder
from score_toolkit.models import CheckpointDtypeWarning, CheckpointError, ScoreMLP, load_model
from score_toolkit.pipeline import ScorePipeline
from score_toolkit.processes import VPSDE, process_from_config
from score_toolkit.registry import get_sampler
from score_toolkit.schedulers import read_scheduler_config

SETTINGS = dict(sampler="euler_maruyama", sampler_options={"num_steps": 2}, seed=3, network_batch_size=4, progress=False)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def exported(tmp_path, name="m"):
    torch.manual_seed(0)
    folder = tmp_path / name
    hub.export_pipeline(ScoreMLP(2, hidden_dim=16, num_layers=1), VPSDE(), "epsilon", "t", folder)
    return folder


def edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------ sampling to a folder (items 1, 8, 9)
def test_sampling_never_deletes_files_it_did_not_write(tmp_path, accelerator):
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "mine.txt").write_text("the user's own file")
    sample_to_folder(vector_pipeline(), out, 4, batch_size=2, shard_size=2, accelerator=accelerator, **SETTINGS)
    assert (out / "shards" / "mine.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["mine.txt"]  # our shards are gone, theirs stay
    # --overwrite replaces only what the earlier run recorded
    (out / "notes.md").write_text("notes")
    sample_to_folder(vector_pipeline(), out, 4, batch_size=2, shard_size=2, accelerator=accelerator, overwrite=True,
                     **{**SETTINGS, "seed": 4})
    assert (out / "shards" / "mine.txt").read_text() == "the user's own file"
    assert (out / "notes.md").read_text() == "notes"
    assert load_samples(out).shape == (4, 2)


def test_a_file_at_a_shard_path_that_the_run_did_not_write_is_not_replaced(tmp_path, accelerator):
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "shard-00000.safetensors").write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError, match="does not record it"):
        sample_to_folder(vector_pipeline(), out, 4, batch_size=2, shard_size=2, accelerator=accelerator,
                         overwrite=True, **SETTINGS)
    assert (out / "shards" / "shard-00000.safetensors").read_bytes() == b"someone else's file"


def test_a_picture_without_a_manifest_is_not_replaced(tmp_path, accelerator):
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples.png").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="samples.png exists without a run manifest"):
        sample_to_folder(vector_pipeline(), out, 2, batch_size=2, accelerator=accelerator, **SETTINGS)
    assert (out / "samples.png").read_bytes() == b"not ours"


def _interrupted_run(out, accelerator, monkeypatch):
    """A run of 8 samples in shards of 4 that stops after its first shard."""
    original = fail_shard(monkeypatch, 1)
    with pytest.raises(OSError):
        sample_to_folder(vector_pipeline(), out, 8, batch_size=4, shard_size=4, accelerator=accelerator, **SETTINGS)
    monkeypatch.setattr(distributed, "write_shard", original)


@pytest.mark.parametrize("bad", ["../elsewhere/shard-00000.safetensors", "ABSOLUTE", "shards/other.safetensors"])
def test_manifest_shard_paths_must_be_the_ones_the_tool_writes(tmp_path, accelerator, monkeypatch, bad):
    out = tmp_path / "out"
    _interrupted_run(out, accelerator, monkeypatch)
    # a shard of 6 samples elsewhere, with the right checksum in the edited manifest
    elsewhere = tmp_path / "elsewhere" / "shard-00000.safetensors"
    elsewhere.parent.mkdir()
    save_file({"samples": torch.zeros(6, 2)}, str(elsewhere))
    name = str(elsewhere) if bad == "ABSOLUTE" else bad
    if bad.startswith("shards/"):
        save_file({"samples": torch.zeros(6, 2)}, str(out / bad))
    from score_toolkit._io import sha256_file

    edit_json(out / MANIFEST_NAME, lambda m: m["shards"]["0"].update(file=name, sha256=sha256_file(elsewhere)))
    with pytest.raises(ValueError, match="corrupt run manifest.*shard 0: expected the file 'shards/shard-00000"):
        sample_to_folder(vector_pipeline(), out, 8, batch_size=4, shard_size=4, accelerator=accelerator, **SETTINGS)
    assert elsewhere.is_file()


def test_list_shaped_manifest_parts_are_clear_errors(tmp_path, accelerator, monkeypatch):
    out = tmp_path / "out"
    _interrupted_run(out, accelerator, monkeypatch)
    edit_json(out / MANIFEST_NAME, lambda m: m.update(shards=[m["shards"]["0"]]))
    with pytest.raises(ValueError, match="expected 'shards' to be an object, found list"):
        sample_to_folder(vector_pipeline(), out, 8, batch_size=4, shard_size=4, accelerator=accelerator, **SETTINGS)
    (out / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not a score_toolkit sample-run manifest"):
        sample_to_folder(vector_pipeline(), out, 8, batch_size=4, shard_size=4, accelerator=accelerator, **SETTINGS)


def test_per_sample_seeds_do_not_collide():
    # the old affine derivation seed * 1_000_003 + i made these two equal
    assert sample_seed(1, 0) != sample_seed(0, 1_000_003)
    a = torch.randn(4, generator=per_sample_generators(1, [0])[0])
    b = torch.randn(4, generator=per_sample_generators(0, [1_000_003])[0])
    assert not torch.equal(a, b)
    seeds = {sample_seed(s, i) for s in range(40) for i in range(500)}
    assert len(seeds) == 40 * 500
    assert all(0 <= x < 2**64 for x in seeds)
    with pytest.raises(ValueError, match="expected seed to be an int >= 0, found -1"):
        sample_seed(-1, 0)


# ------------------------------------------------------------------------ strict configs (item 5)
def test_use_default_values_never_overrides_what_the_file_says(tmp_path):
    folder = exported(tmp_path)
    edit_json(folder / "scheduler" / "scheduler_config.json",
              lambda c: c.update(_use_default_values=["prediction_type", "time_input"]))
    assert hub.load_pipeline_components(folder).prediction_type == "epsilon"
    assert ScorePipeline.from_pretrained(folder).spec[1:] == ("epsilon", "t")
    from diffusers import DiffusionPipeline

    import score_toolkit  # noqa: F401  (makes the components loadable by diffusers)

    assert DiffusionPipeline.from_pretrained(folder).scheduler.config.prediction_type == "epsilon"


@pytest.mark.parametrize("where, typo, right", [
    ("scheduler", "predicton_type", "prediction_type"),
    ("process", "beta_mx", "beta_max"),
])
def test_typos_in_scheduler_and_process_configs_are_errors(tmp_path, where, typo, right):
    folder = exported(tmp_path)

    def add(c):
        (c if where == "scheduler" else c["process"])[typo] = 1.0

    edit_json(folder / "scheduler" / "scheduler_config.json", add)
    pattern = f"unknown key.*'{typo}' \\(did you mean '{right}'\\?\\)"
    with pytest.raises(ValueError, match=pattern):
        hub.load_pipeline_components(folder)
    with pytest.raises(ValueError, match=pattern):
        ScorePipeline.from_pretrained(folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    with pytest.raises(ValueError, match=pattern):
        read_scheduler_config(config)


def test_typo_in_a_diffusers_scheduler_config_is_an_error(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    folder = tmp_path / "ddpm"
    ScorePipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
                  ).save_pretrained(folder)
    edit_json(folder / "scheduler" / "scheduler_config.json", lambda c: c.update(_use_default_values=["prediction_type"]))
    assert ScorePipeline.from_pretrained(folder).spec[1] == "v_prediction"
    assert hub.load_pipeline_components(folder).prediction_type == "v_prediction"
    edit_json(folder / "scheduler" / "scheduler_config.json", lambda c: c.update(beta_ed=0.5))
    with pytest.raises(ValueError, match="'beta_ed' \\(did you mean 'beta_end'\\?\\)"):
        ScorePipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="'beta_ed'"):
        hub.load_pipeline_components(folder)


def test_process_config_is_strict():
    with pytest.raises(ValueError, match="'beta_mx' \\(did you mean 'beta_max'\\?\\)"):
        process_from_config({"_class_name": "VPSDE", "beta_min": 0.1, "beta_mx": 5.0})
    vp = process_from_config({"_class_name": "VPSDE", "beta_min": 0.1, "beta_max": 5.0,
                              "_use_default_values": ["beta_max"]})
    assert vp.config.beta_max == 5.0


# ------------------------------------------------------------------------ weights (items 6, 14)
def _rewrite_weights(folder, fn):
    path = folder / WEIGHTS
    tensors = load_file(str(path))
    save_file({k: fn(k, v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_boolean_weights_are_refused(tmp_path, dtype):
    folder = tmp_path / "mlp"
    ScoreMLP(2, hidden_dim=8, num_layers=1).save_pretrained(folder)
    _rewrite_weights(folder, lambda k, v: (v * 1000).to(dtype) if k.endswith("weight") else v)
    with pytest.raises(CheckpointError, match=r"non-floating-point types \[.*weight: (I64|BOOL)"):
        load_model(ScoreMLP, folder)


@pytest.mark.parametrize("dtype, name", [(torch.float16, "float16"), (torch.float64, "float64")])
def test_other_float_weights_are_converted_with_a_named_warning(tmp_path, dtype, name):
    folder = tmp_path / "mlp"
    model = ScoreMLP(2, hidden_dim=8, num_layers=1)
    model.save_pretrained(folder)
    _rewrite_weights(folder, lambda k, v: v.to(dtype))
    with pytest.warns(CheckpointDtypeWarning, match=f"stored as {name}.*loaded as float32") as rec:
        loaded = load_model(ScoreMLP, folder)
    assert {w.filename for w in rec if issubclass(w.category, CheckpointDtypeWarning)} == {__file__}  # the caller
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointDtypeWarning)
        same = load_model(ScoreMLP, folder, torch_dtype=dtype)  # asked for: no warning
    assert all(p.dtype == dtype for p in same.parameters())


def test_a_huge_config_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    folder = exported(tmp_path)
    edit_json(folder / "unet" / "config.json", lambda c: c.update(hidden_dim=200_000))
    original = torch.nn.Linear.__init__

    def guarded(self, in_features, out_features, bias=True, device=None, dtype=None):
        meta = torch.get_default_device().type == "meta" or (device is not None and torch.device(device).type == "meta")
        if in_features * out_features > 10**8 and not meta:
            raise AssertionError(f"allocated a {in_features} x {out_features} weight before checking the weight file")
        original(self, in_features, out_features, bias=bias, device=device, dtype=dtype)

    monkeypatch.setattr(torch.nn.Linear, "__init__", guarded)
    with pytest.raises(CheckpointError, match="mis-shaped weights.*config.json describes another network"):
        load_model(None, folder, subfolder="unet")
    with pytest.raises(CheckpointError, match="mis-shaped"):
        hub.load_pipeline_components(folder)
    with pytest.raises((CheckpointError, ValueError), match="mis-shaped"):
        ScorePipeline.from_pretrained(folder)


def test_non_utf8_config_is_a_clear_error(tmp_path):
    folder = exported(tmp_path)
    (folder / "unet" / "config.json").write_bytes(b'{"_class_name": "ScoreMLP", "dim": 2, "x": "\xff\xfe"}')
    with pytest.raises(ValueError, match="expected JSON text in UTF-8"):
        hub.load_pipeline_components(folder)
    with pytest.raises(ValueError, match="(?i)utf-8"):
        ScorePipeline.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="expected JSON text in UTF-8"):
        load_model(None, folder, subfolder="unet")
    (folder / "scheduler" / "scheduler_config.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="expected JSON text in UTF-8"):
        hub.load_pipeline_components(folder)


# ------------------------------------------------------------------------ raw tracebacks at public boundaries
def test_zero_byte_npy_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"expected a numeric \.npy array .* found an empty file \(0 bytes\)"):
        load_vectors(empty)
    truncated = tmp_path / "truncated.npy"
    np.save(truncated, np.zeros((4, 2)))
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"numeric \.npy array"):
        load_vectors(truncated)


def test_sampler_boundary_errors():
    sampler = get_sampler("euler_maruyama", num_steps=2)
    score = lambda x, t: -x  # noqa: E731
    with pytest.raises(ValueError, match=r"expected x_init with at least one sample .* found shape \(0, 2\)"):
        sampler.sample(score, VPSDE(), torch.zeros(0, 2))
    with pytest.raises(TypeError, match="expected generator to be a torch.Generator.*found int 0"):
        sampler.sample(score, VPSDE(), shape=(2, 2), generator=0)
    with pytest.raises(TypeError, match=r"found a list holding \['int'\]"):
        sampler.sample(score, VPSDE(), shape=(2, 2), generator=[1, 2])


@pytest.mark.parametrize("command", ["likelihood", "evaluate"])
def test_commands_report_a_zero_byte_npy_in_one_line(tmp_path, capsys, command):
    from score_toolkit.cli import main

    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    args = {"likelihood": ["likelihood", "--model", "analytic:ring", "--process", "VP", "--data-file", str(empty)],
            "evaluate": ["evaluate", "--model", "analytic:ring", "--process", "VP", "--sampler", "ancestral",
                         "--option", "num_steps=2", "--num-samples", "8", "--reference", str(empty)]}[command]
    assert main(args) == 2  # a damaged input file: a usage error, before any work
    err = capsys.readouterr().err
    assert f"score-toolkit {command}: error:" in err and "found an empty file (0 bytes)" in err, err
    assert "Traceback" not in err
