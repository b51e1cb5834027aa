"""The model's own grids (score_toolkit.model_grids, ``score-toolkit fit-grid``, the pipeline's default grid): a tiny
2-D model folder and a tiny pilot (64 draws, 10 ODE steps, 3 fit iterations)."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from score_toolkit import cli
from score_toolkit.model_grids import ModelGridWarning, fit_model_grids, model_grid_path, weights_sha256
from score_toolkit.models import ScoreMLP
from score_toolkit.pipeline import ScorePipeline
from score_toolkit.processes import VESDE, VPSDE
from score_toolkit.registry import get_sampler
from score_toolkit.schedulers import scheduler_for

TINY = ["--num-pilot", "64", "--pilot-steps", "10", "--fit-option", "iterations=3", "--fit-option", "num_samples=64",
        "--fit-option", "num_validation=128", "--validation-draws", "64", "--no-progress"]
TINY_FIT = {"num_pilot": 64, "pilot_steps": 10, "iterations": 3, "num_samples": 64, "num_validation": 128,
            "validation_draws": 64, "progress": False}


def _model(folder, seed=0):
    torch.manual_seed(seed)
    pipe = ScorePipeline(unet=ScoreMLP(2, hidden_dim=16, num_layers=1).eval(),
                         scheduler=scheduler_for(VPSDE(), "epsilon", "t"))
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A model folder with its default grids, fitted by the command (once for the module)."""
    folder = _model(tmp_path_factory.mktemp("mg") / "model")
    assert cli.main(["fit-grid", str(folder), *TINY]) == 0
    return folder


def _copy(fitted, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(fitted, dst)
    return dst


def _set_winner(folder, winner):
    """Construct a validation outcome: the files' records say ``winner`` won (the pipeline's decision is tested on
    it; the validation itself is tested on genuine runs below)."""
    for n in (24, 14):
        path = model_grid_path(folder, "unipc", n)
        record = json.loads(path.read_text())
        record["info"]["validation"]["winner"] = winner
        path.write_text(json.dumps(record))


@pytest.fixture(scope="module")
def used(fitted, tmp_path_factory):
    """A copy of ``fitted`` whose validation records say the stored grids won."""
    folder = tmp_path_factory.mktemp("mg_used") / "model"
    shutil.copytree(fitted, folder)
    _set_winner(folder, "model_grid")
    return folder


def _run(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=16, generator=torch.Generator().manual_seed(3), **kw)


def test_fit_grid_writes_the_default_budgets_with_their_record(fitted):
    for n in (24, 14):
        path = model_grid_path(fitted, "unipc", n)
        record = json.loads(path.read_text())
        assert record["format"] == "score_toolkit.time_grid" and record["num_steps"] == n and record["sampler"] == "unipc"
        info = record["info"]
        assert info["model_grid"]["weights_sha256"] == weights_sha256(fitted)
        assert info["model_grid"]["sampler_options"]["order"] == 3 and info["model_grid"]["sampler_options"]["to_zero"]
        assert info["model_grid"]["command"].startswith(f"score-toolkit fit-grid {fitted} --num-pilot 64")
        assert info["pilot_grid"]["num_pilot"] == 64 and info["pilot_grid"]["pilot_steps"] == 10
        assert info["pilot_grid"]["process"] == repr(VPSDE())
        assert info["score_evaluations"] == 64 * 11  # one pilot, shared by both budgets
    a = json.loads(model_grid_path(fitted, "unipc", 24).read_text())
    b = json.loads(model_grid_path(fitted, "unipc", 14).read_text())
    assert a["info"]["pilot_seconds"] == b["info"]["pilot_seconds"]  # the same pilot, recorded in both


def test_the_file_is_a_pilot_grid_cache_and_the_same_as_pilot_grid(fitted):
    """Same pilot settings and seed -> the grid pilot_grid makes; and pilot_grid reads the file as its cache."""
    from score_toolkit.samplers.grid_store import load_grid
    from score_toolkit.samplers.pilot_grid import pilot_grid

    pipe = ScorePipeline.from_pretrained(fitted)
    process, fit = pipe.spec[0], {k: v for k, v in TINY_FIT.items() if k not in ("num_pilot", "pilot_steps", "progress", "validation_draws")}
    sampler = get_sampler("unipc", num_steps=14)
    path = model_grid_path(fitted, "unipc", 14)
    fresh = pilot_grid(sampler, pipe.score_function(), process, (2,), num_pilot=64, pilot_steps=10, batch_size=512,
                       dtype=torch.float32, **fit)
    assert torch.allclose(fresh.times, load_grid(path, process), rtol=0, atol=1e-9)
    cached = pilot_grid(sampler, pipe.score_function(), process, (2,), num_pilot=64, pilot_steps=10, cache=path, **fit)
    assert cached.cached and cached.score_evaluations == 0


def test_the_pipeline_uses_the_stored_grid_by_default(used, caplog):
    pipe = ScorePipeline.from_pretrained(used)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level("INFO", logger="score_toolkit.pipeline"):
            default = _run(pipe)  # the default sampler and steps: unipc, 24
    path = model_grid_path(used, "unipc", 24)
    assert default.grid == str(path) and default.nfe == 25
    assert f"using the model's grid {path}" in caplog.text
    explicit = _run(pipe, grid=str(path))
    builtin = _run(pipe, num_inference_steps=24, grid="fitted")
    assert torch.equal(default.samples, explicit.samples)
    assert (default.samples - builtin.samples).abs().max() > 1e-4  # the stored grid is not the built-in one
    # num_steps 14 has its own stored grid; 10 has none: the built-in default, no warning
    assert _run(pipe, num_inference_steps=14).grid == str(model_grid_path(used, "unipc", 14))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other = _run(pipe, num_inference_steps=10)
    assert other.grid == "fitted" and torch.equal(other.samples, _run(pipe, num_inference_steps=10, grid="fitted").samples)


def test_an_explicit_grid_and_a_sampler_instance_win(fitted):
    pipe = ScorePipeline.from_pretrained(fitted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _run(pipe, grid="log_sigma")
        inst = _run(pipe, sampler=get_sampler("unipc", num_steps=24))
    assert out.grid == "log_sigma" and out.nfe == 25
    assert inst.grid == "fitted"


def test_other_weights_give_a_warning_and_the_default_grid(fitted, tmp_path):
    folder = _copy(fitted, tmp_path)
    _model(tmp_path / "other", seed=1)
    shutil.copy(tmp_path / "other" / "unet" / "diffusion_pytorch_model.safetensors",
                folder / "unet" / "diffusion_pytorch_model.safetensors")
    pipe = ScorePipeline.from_pretrained(folder)
    with pytest.warns(ModelGridWarning, match="fitted for other weights"):
        out = _run(pipe)
    assert out.grid == "fitted"
    assert torch.equal(out.samples, _run(pipe, num_inference_steps=24, grid="fitted").samples)


def test_the_warning_points_at_the_callers_line(fitted, tmp_path):
    """Whichever public entry point chooses the grid (the pipeline's call, make_sampler, sample_to_folder), the
    warning names the line of the code that called it, not a line inside score_toolkit."""
    from accelerate import Accelerator

    from score_toolkit.distributed import sample_to_folder

    folder = _copy(fitted, tmp_path)
    _model(tmp_path / "other", seed=1)
    shutil.copy(tmp_path / "other" / "unet" / "diffusion_pytorch_model.safetensors",
                folder / "unet" / "diffusion_pytorch_model.safetensors")
    pipe = ScorePipeline.from_pretrained(folder)
    calls = {"call": lambda: _run(pipe), "make_sampler": lambda: pipe.make_sampler(),
             "sample_to_folder": lambda: sample_to_folder(pipe, tmp_path / "s", 4, sampler="unipc",
                                                          sampler_options={"num_steps": 24}, batch_size=4,
                                                          progress=False, accelerator=Accelerator(cpu=True))}
    where = {}
    for what, call in calls.items():
        with pytest.warns(ModelGridWarning, match="fitted for other weights") as record:
            call()
        where[what] = [w.filename for w in record if w.category is ModelGridWarning]
    assert where == {what: [__file__] for what in calls}
    folder = shutil.copytree(fitted, tmp_path / "damaged")  # the other warning: a stored grid that cannot be loaded
    _set_winner(folder, "model_grid")
    path = model_grid_path(folder, "unipc", 24)
    record = json.loads(path.read_text())
    record["log_snr"] = list(reversed(record["log_snr"]))
    path.write_text(json.dumps(record))
    with pytest.warns(ModelGridWarning, match=f"stored grid {path} not used: ") as record:
        _run(ScorePipeline.from_pretrained(folder))
    assert [w.filename for w in record if w.category is ModelGridWarning] == [__file__]


def test_other_sampler_options_or_process_give_a_warning_and_the_default_grid(fitted):
    pipe = ScorePipeline.from_pretrained(fitted)
    with pytest.warns(ModelGridWarning, match=r"other sampler options .*'order': \(3, 2\)") as record:
        out = _run(pipe, order=2)
    assert "fit-grid" not in str(record[0].message)  # refitting would replace the grid of the default options
    assert out.grid == "fitted" and torch.equal(out.samples, _run(pipe, order=2, num_inference_steps=24, grid="fitted").samples)
    with pytest.warns(ModelGridWarning, match="other sampler options .*to_zero"):
        assert _run(pipe, to_zero=False, denoise=True).grid == "fitted"
    pipe.scheduler = scheduler_for(VESDE(), "epsilon", "t")
    with pytest.warns(ModelGridWarning, match="fitted under VPSDE"):
        assert _run(pipe).grid == "fitted"


def test_conditional_and_folderless_pipelines_use_the_builtin_grid(used):
    pipe = ScorePipeline.from_pretrained(used)
    bare = ScorePipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _run(bare).grid == "fitted"
        assert pipe.make_sampler("unipc", conditional=True).config["grid"] == "fitted"
    assert pipe.make_sampler("unipc").config["grid"] == str(model_grid_path(used, "unipc", 24))


def test_a_foreign_file_is_never_replaced_nor_used(fitted, tmp_path, capsys):
    from score_toolkit.samplers.grid_store import save_grid

    folder = _copy(fitted, tmp_path)
    path = model_grid_path(folder, "unipc", 14)
    path.unlink()
    save_grid(path, VPSDE().time_grid(14, "uniform", dtype=torch.float64), VPSDE(), sampler="unipc")
    before = path.read_bytes()
    assert cli.main(["fit-grid", str(folder), *TINY]) == 2
    assert "was not written by fit_model_grids" in capsys.readouterr().err
    assert path.read_bytes() == before
    with pytest.warns(ModelGridWarning, match="not written by fit_model_grids"):
        assert _run(ScorePipeline.from_pretrained(folder), num_inference_steps=14).grid == "fitted"
    path.write_text("{not json")
    with pytest.warns(ModelGridWarning, match=r"unipc_14.json is not valid JSON \(JSONDecodeError: "):
        assert _run(ScorePipeline.from_pretrained(folder), num_inference_steps=14).grid == "fitted"


def test_refitting_keeps_an_up_to_date_grid_and_replaces_a_stale_one(fitted, tmp_path):
    folder = _copy(fitted, tmp_path)
    path = model_grid_path(folder, "unipc", 24)
    before = path.read_bytes()
    fits = fit_model_grids(ScorePipeline.from_pretrained(folder), command="x", **TINY_FIT)
    assert [f.status for f in fits] == ["up_to_date", "up_to_date"] and path.read_bytes() == before
    # other settings: its own file, refitted
    fits = fit_model_grids(ScorePipeline.from_pretrained(folder), steps=[24], seed=5, **TINY_FIT)
    assert fits[0].status == "fitted" and json.loads(path.read_text())["info"]["pilot_grid"]["seed"] == 5


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "nope"], "unknown sampler"),
    (["--sampler", "euler_maruyama"], "deterministic fixed-grid sampler"),
    (["--option", "grid=karras"], "--option grid: not an option here"),
    (["--option", "colour=3"], "unknown option"),
    (["--steps", "0"], "expected --steps to be an integer >= 1, found 0"),
    (["--num-pilot", "1"], "--num-pilot"),
    (["--fit-option", "iteratons=3"], "unknown fit option(s) ['iteratons']"),
    (["--fit-option", "save_as=x"], "unknown fit option(s) ['save_as']"),
    (["--validation-draws", "0"], "expected --validation-draws to be an integer >= 2, found 0"),
    (["--validation-seed", "271828"], "validation_seed to differ"),
])
def test_bad_inputs_give_clear_errors(fitted, tmp_path, capsys, argv, message):
    folder = _copy(fitted, tmp_path)
    before = {p.name: p.read_bytes() for p in (folder / "grids").iterdir()}
    assert cli.main(["fit-grid", str(folder), *argv, "--no-progress"]) != 0
    assert message in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (folder / "grids").iterdir()} == before
    assert cli.main(["fit-grid", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "expected MODEL_DIR" in capsys.readouterr().err


def test_sample_command_uses_and_records_the_model_grid(used, tmp_path):
    out = tmp_path / "s"
    assert cli.main(["sample", str(used), "--num-samples", "8", "--batch-size", "8", "--steps", "14",
                     "--output-dir", str(out), "--cpu", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    run = manifest.get("run", manifest)
    assert run["grid"]["path"] == str(model_grid_path(used, "unipc", 14))


def test_train_fits_the_grids_unless_told_not_to(tmp_path):
    import yaml
    from helpers import small_run_config

    def config(out):
        cfg = small_run_config(out, num_samples=256, train_defaults={"steps": 2, "batch_size": 32, "checkpoint_every": 2,
                                                                     "log_every": 1})
        cfg["export"] = {"enabled": True, "num_samples": 8, "sampler": "dpmpp_2m", "sampler_options": {"num_steps": 5}}
        return cfg

    (tmp_path / "a.yaml").write_text(yaml.safe_dump(config(tmp_path / "a")))
    assert cli.main(["train", "--config", str(tmp_path / "a.yaml"), "--no-fit-grid", "--no-progress"]) == 0
    export = tmp_path / "a" / "pipeline"
    assert (export / "model_index.json").is_file() and not (export / "grids").exists()
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(config(tmp_path / "b")))
    assert cli.main(["train", "--config", str(tmp_path / "b.yaml"), "--grid-pilot", "64", "--grid-pilot-steps", "10",
                     "--grid-fit-option", "iterations=3", "--grid-fit-option", "num_samples=64",
                     "--grid-fit-option", "num_validation=128", "--no-progress"]) == 0
    export = tmp_path / "b" / "pipeline"
    for n in (24, 14):
        info = json.loads(model_grid_path(export, "unipc", n).read_text())["info"]
        assert info["model_grid"]["weights_sha256"] == weights_sha256(export)
        assert info["model_grid"]["command"].startswith("score-toolkit train --config")


@pytest.mark.parametrize("name", ["digits"])
def test_the_shipped_grids_belong_to_the_shipped_weights(name):
    """hub_cards/<name>/grids: written by the command its card records, for the weights shipped next to them, and
    what the pipeline (so score-toolkit sample) runs by default."""
    from score_toolkit.pipeline import shipped_model_path

    folder = shipped_model_path(name)
    card = (folder / "README.md").read_text()
    pipe = ScorePipeline.from_pretrained(folder)
    for n in (24, 14):
        path = model_grid_path(folder, "unipc", n)
        info = json.loads(path.read_text())["info"]
        assert info["model_grid"]["command"].startswith(f"score-toolkit fit-grid hub_cards/{name}")
        assert f"`{info['model_grid']['command']}`" in card
        assert info["model_grid"]["weights_sha256"] == weights_sha256(folder)
        assert info["pilot_grid"]["num_pilot"] == 2048 and info["pilot_grid"]["pilot_steps"] == 100
        v = info["validation"]
        assert v["settings"]["draws"] == 256 and v["settings"]["reference"]["num_steps"] == 100
        assert (v["winner"] == "model_grid") == (v["model_grid"]["rms"] < v["built_in"]["rms"])
        used = str(path) if v["winner"] == "model_grid" else v["settings"]["built_in_grid"]
        label = f"grids/unipc_{n}.json" if v["winner"] == "model_grid" else f"built-in {used}"
        assert f"| {n + 1} | `{label}` |" in card  # the card says which grid each budget uses
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert pipe.make_sampler(num_inference_steps=n).config["grid"] == used


def _errors(pipe, sampler, x1, ref):
    out = sampler.sample(pipe.score_function(), pipe.spec[0], x_init=x1).samples.double()
    d = (out - ref).norm(dim=1) / ref.shape[1] ** 0.5
    return float(d.pow(2).mean().sqrt()), float(torch.quantile(d, 0.5)), float(torch.quantile(d, 0.99))


def test_fit_grid_validates_each_grid_on_the_model_ode(fitted):
    """The record: the stored grid and the built-in grid run from the held-out draws, against the converged ODE of
    the network from the same draws; recomputed here independently."""
    from score_toolkit.samplers.dpm_solver import DPMSolverPP3M

    pipe = ScorePipeline.from_pretrained(fitted)
    process = pipe.spec[0]
    x1 = process.prior_sample((64, 2), generator=torch.Generator().manual_seed(314_159), dtype=torch.float32)
    with torch.no_grad():
        ref = DPMSolverPP3M(num_steps=10, grid="log_sigma", to_zero=True).sample(
            pipe.score_function(), process, x_init=x1).samples.double()
        for n in (24, 14):
            path = model_grid_path(fitted, "unipc", n)
            v = json.loads(path.read_text())["info"]["validation"]
            assert v["settings"] == {"draws": 64, "seed": 314_159, "built_in_grid": "fitted", "reference": {
                "sampler": "dpmpp_3m", "num_steps": 10, "grid": "log_sigma", "to_zero": True}}
            for key, grid in (("model_grid", str(path)), ("built_in", "fitted")):
                rms, median, q99 = _errors(pipe, get_sampler("unipc", num_steps=n, grid=grid), x1, ref)
                assert v[key]["rms"] == pytest.approx(rms, rel=1e-4)
                assert v[key]["median"] == pytest.approx(median, rel=1e-4)
                assert v[key]["q99"] == pytest.approx(q99, rel=1e-4)
            assert v["winner"] == ("model_grid" if v["model_grid"]["rms"] < v["built_in"]["rms"] else "built_in")
            assert v["reference_score_evaluations"] == 64 * 11 and v["score_evaluations"] == 2 * 64 * (n + 1)
            assert v["seconds"] > 0 and v["reference_seconds"] > 0


def _bad_grid(folder, n):
    """Replace the stored grid of ``n`` steps by a time-uniform one (poor under VP), keeping its record but not its
    validation: what an unvalidated poor fit looks like."""
    from score_toolkit.samplers.grid_store import save_grid

    path = model_grid_path(folder, "unipc", n)
    info = json.loads(path.read_text())["info"]
    del info["validation"]
    save_grid(path, VPSDE().time_grid(n, "uniform", dtype=torch.float64), VPSDE(), sampler="unipc", overwrite=True,
              info=info)
    return path


def test_a_grid_that_loses_the_validation_is_not_used(fitted, tmp_path, caplog):
    folder = _copy(fitted, tmp_path)
    path = _bad_grid(folder, 14)
    kept = model_grid_path(folder, "unipc", 24).read_bytes()
    fits = fit_model_grids(ScorePipeline.from_pretrained(folder), **TINY_FIT)  # only the validation runs for 14
    assert [f.status for f in fits] == ["up_to_date", "validated"]
    assert model_grid_path(folder, "unipc", 24).read_bytes() == kept
    v = fits[1].validation
    assert v == json.loads(path.read_text())["info"]["validation"]  # the record round-trips
    assert v["winner"] == "built_in" and v["model_grid"]["rms"] > v["built_in"]["rms"]
    pipe = ScorePipeline.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tool's own recorded decision: no warning
        with caplog.at_level("INFO", logger="score_toolkit.pipeline"):
            out = _run(pipe, num_inference_steps=14)
    assert out.grid == "fitted" and torch.equal(out.samples, _run(pipe, num_inference_steps=14, grid="fitted").samples)
    assert "the model's validation preferred the built-in grid: rms" in caplog.text


def test_a_grid_that_wins_the_validation_is_used(fitted, tmp_path, monkeypatch):
    """A poorer built-in grid (time-uniform, patched in as the sampler's default) loses to the model's grid (the
    sampler's settings changed, so the grid is refitted, then validated against that built-in grid)."""
    from score_toolkit.samplers.unipc import UniPC

    folder = _copy(fitted, tmp_path)
    monkeypatch.setitem(UniPC.options, "grid", "uniform")
    fits = fit_model_grids(ScorePipeline.from_pretrained(folder), steps=[14], **TINY_FIT)
    v = fits[0].validation
    assert v["settings"]["built_in_grid"] == "uniform"
    assert v["winner"] == "model_grid" and v["model_grid"]["rms"] < v["built_in"]["rms"]
    pipe = ScorePipeline.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _run(pipe, num_inference_steps=14).grid == str(fits[0].path)


def test_files_without_validation_are_not_used_and_get_it_without_refitting(fitted, tmp_path, caplog):
    """A fitted but unvalidated file (what an interrupted fit-grid leaves) is not used; fit-grid validates it."""
    from score_toolkit.model_grids import model_grid_for

    folder = _copy(fitted, tmp_path)
    path = model_grid_path(folder, "unipc", 14)
    record = json.loads(path.read_text())
    del record["info"]["validation"]
    path.write_text(json.dumps(record))
    pipe = ScorePipeline.from_pretrained(folder)
    choice = model_grid_for(folder, get_sampler("unipc", num_steps=14), pipe.spec[0])
    assert choice.path is None and choice.warning is None and "not validated" in choice.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _run(pipe, num_inference_steps=14).grid == "fitted"
    fits = fit_model_grids(pipe, steps=[14], **TINY_FIT)
    after = json.loads(path.read_text())
    assert fits[0].status == "validated" and after["times"] == record["times"]
    assert after["info"]["validation"]["settings"]["draws"] == 64
    fits = fit_model_grids(pipe, steps=[14], **{**TINY_FIT, "validation_draws": 32})  # other validation settings
    assert fits[0].status == "validated" and json.loads(path.read_text())["info"]["validation"]["settings"]["draws"] == 32
    assert fit_model_grids(pipe, steps=[14], **{**TINY_FIT, "validation_draws": 32})[0].status == "up_to_date"


def test_an_interrupted_fit_leaves_no_grid_in_use(fitted, tmp_path, monkeypatch):
    """fit-grid stopped after writing its fits but before their validation (Ctrl-C, an error): the pipeline keeps
    the built-in grid."""
    import score_toolkit.model_grids as mg

    folder = _copy(fitted, tmp_path)
    for n in (24, 14):
        model_grid_path(folder, "unipc", n).unlink()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mg, "_validate", interrupted)
    pipe = ScorePipeline.from_pretrained(folder)
    with pytest.raises(KeyboardInterrupt):
        fit_model_grids(pipe, **TINY_FIT)
    assert model_grid_path(folder, "unipc", 24).is_file()  # the fit was written
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _run(ScorePipeline.from_pretrained(folder)).grid == "fitted"


def test_another_sample_shape_uses_the_builtin_grid(used):
    pipe = ScorePipeline.from_pretrained(used)
    assert _run(pipe).grid == str(model_grid_path(used, "unipc", 24))
    with pytest.warns(ModelGridWarning, match=r"fitted for samples of shape \(2,\), these are \(3,\)"):
        assert pipe.make_sampler("unipc", sample_shape=(3,)).config["grid"] == "fitted"


def test_an_operator_or_mask_in_the_call_uses_the_builtin_grid(used):
    pipe = ScorePipeline.from_pretrained(used)
    mask = torch.tensor([1.0, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _run(pipe, mask=mask, observation=torch.zeros(16, 2))
    assert out.grid == "fitted"


@pytest.mark.parametrize("edit", ["rms", "pilot_grid", "sampler_options", "settings", "log_snr"])
def test_a_damaged_record_gives_a_warning_and_the_default_grid(used, tmp_path, edit):
    folder = _copy(used, tmp_path)
    path = model_grid_path(folder, "unipc", 24)
    record = json.loads(path.read_text())
    info = record["info"]
    if edit == "rms":
        info["validation"]["model_grid"]["rms"] = "x"
    elif edit == "pilot_grid":
        info["pilot_grid"] = "x"
    elif edit == "sampler_options":
        info["model_grid"]["sampler_options"] = [1]
    elif edit == "settings":
        info["validation"]["settings"] = "x"
    else:
        record["log_snr"] = list(reversed(record["log_snr"]))
    path.write_text(json.dumps(record))
    with pytest.warns(ModelGridWarning, match="not used"):
        assert _run(ScorePipeline.from_pretrained(folder)).grid == "fitted"


def test_a_validation_against_another_built_in_grid_is_not_trusted(fitted, tmp_path, monkeypatch):
    """The record of ``fitted`` says the built-in "fitted" grid won; with another built-in default (a later version's)
    that decision is stale: the stored grid is not used (as an unvalidated one), and fit-grid re-validates it."""
    from score_toolkit.model_grids import model_grid_for
    from score_toolkit.samplers.unipc import UniPC

    folder = _copy(fitted, tmp_path)
    path = model_grid_path(folder, "unipc", 14)
    _set_winner(folder, "built_in")
    assert model_grid_for(folder, get_sampler("unipc", num_steps=14), VPSDE()).path is None
    monkeypatch.setitem(UniPC.options, "grid", "log_sigma")
    choice = model_grid_for(folder, get_sampler("unipc", num_steps=14), VPSDE())
    assert choice.path is None and choice.warning is None
    assert "validated against the built-in grid 'fitted', not this sampler's 'log_sigma'" in choice.reason
    _set_winner(folder, "model_grid")  # even a win against another built-in grid is stale
    assert model_grid_for(folder, get_sampler("unipc", num_steps=14), VPSDE()).path is None
    fit_model_grids(ScorePipeline.from_pretrained(folder), steps=[14], **TINY_FIT)  # re-validates (or refits)
    record = json.loads(path.read_text())
    assert record["info"]["validation"]["settings"]["built_in_grid"] == "log_sigma"


def test_a_malformed_validation_record_gives_a_warning_and_the_default_grid(fitted, tmp_path):
    folder = _copy(fitted, tmp_path)
    _set_winner(folder, "mine")
    with pytest.warns(ModelGridWarning, match="record is malformed"):
        assert _run(ScorePipeline.from_pretrained(folder), num_inference_steps=14).grid == "fitted"


@pytest.mark.parametrize("options, message", [
    ({"validation_draws": 1}, "validation_draws to be an int >= 2"),
    ({"validation_draws": True}, "validation_draws to be an int >= 2"),
    ({"validation_seed": -1}, "validation_seed to be an int >= 0"),
    ({"validation_seed": 7, "seed": 7}, "validation_seed to differ from the pilot's seed"),
])
def test_bad_validation_options_give_clear_errors(fitted, tmp_path, options, message):
    folder = _copy(fitted, tmp_path)
    before = {p.name: p.read_bytes() for p in (folder / "grids").iterdir()}
    with pytest.raises(ValueError, match=message):
        fit_model_grids(ScorePipeline.from_pretrained(folder), **{**TINY_FIT, **options})
    assert {p.name: p.read_bytes() for p in (folder / "grids").iterdir()} == before
