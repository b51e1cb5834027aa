"""The commands' input checks: bad values, conflicting options and files the command did not write are refused
with a one-line error and exit code 2 before any work (docs/cli.md, "Exit codes")."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from score_toolkit.cli import main
from score_toolkit.pipeline import shipped_model_path

RING = ["likelihood", "--model", "analytic:ring", "--process", "VP", "-q"]


def _error(capsys, argv) -> str:
    """Run a command that must be refused: exit code 2, one ``error:`` line, nothing on stdout."""
    assert main(argv) == 2, argv
    out, err = capsys.readouterr()
    assert out == "" and "error:" in err and "Traceback" not in err, (out, err)
    return err


@pytest.fixture
def damaged_model(tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(shipped_model_path("toy2d"), folder)
    (folder / "unet" / "config.json").write_text("{")
    return str(folder)


# ------------------------------------------------------------------------------------------- likelihood
@pytest.mark.parametrize("n", ["-5", "0"])
def test_likelihood_refuses_a_count_below_one(capsys, n):
    assert "expected --num-samples to be an integer >= 1, found " + n in _error(capsys, [*RING, "--num-samples", n])


def test_load_data_refuses_a_slice_of_the_data():
    from score_toolkit.cli._common import CLIError, load_data

    for n in (-5, 0):
        with pytest.raises(CLIError, match="--num-samples"):
            load_data("ring", None, num_samples=n, model={"mixture": None}, seed=0, dtype=torch.float64)


@pytest.mark.parametrize("extra, found", [
    (["--grid", "foo"], "grid only applies to fixed-grid methods"),
    (["--grid", "karras", "--method", "dopri5"], "grid only applies to fixed-grid methods"),
    (["--method", "rk4", "--num-steps", "4", "--grid", "foo"], "expected grid in"),
    (["--method", "dopri"], "expected method in"),
    (["--rtol", "-1"], "expected rtol > 0"),
    (["--data", "rings"], "unknown dataset 'rings'"),
    (["--batch-size", "0"], "expected --batch-size to be an integer >= 1"),
    (["--per-sample"], "pass --output FILE"),
    (["--seed", "-3"], "expected --seed to be an integer >= 0"),
])
def test_likelihood_bad_values_are_usage_errors(capsys, extra, found):
    assert found in _error(capsys, [*RING, "--num-samples", "4", *extra])


def test_log_likelihood_refuses_a_grid_with_an_adaptive_method():
    from score_toolkit.analytic import ring_mixture
    from score_toolkit.likelihood import log_likelihood
    from score_toolkit.processes import VPSDE

    process, mixture = VPSDE(0.1, 20.0), ring_mixture()
    x = mixture.sample(2, generator=torch.Generator().manual_seed(0)).double()
    with pytest.raises(ValueError, match="grid only applies to fixed-grid methods"):
        log_likelihood(mixture.score_fn(process), process, x, method="dopri5", grid="karras")
    fixed = [log_likelihood(mixture.score_fn(process), process, x, method="euler", num_steps=4, **kw).log_prob
             for kw in ({}, {"grid": "uniform"})]
    assert torch.equal(fixed[0], fixed[1])  # the fixed-grid default is still the uniform grid


def test_likelihood_damaged_model_is_exit_code_2_as_in_sample(capsys, damaged_model):
    for argv in (["likelihood", "--model", damaged_model, "--data", "ring", "--num-samples", "4"],
                 ["sample", damaged_model, "--output-dir", "unused"]):
        assert "corrupt the network config" in _error(capsys, argv)


# ------------------------------------------------------------------------------------------- every command
@pytest.mark.parametrize("argv, found", [
    (["sample", "--threads", "-1", "--output-dir", "unused"], "expected --threads to be an integer >= 0, found -1"),
    (["demo", "--sampler", "foo", "--steps", "1"], "unknown sampler 'foo'"),
    (["demo", "--seed", "-3", "--steps", "1"], "expected --seed to be an integer >= 0, found -3"),
    (["sample", "--model", "digits_class_conditional", "--class-label", "3", "--guidance-scale", "nan",
      "--output-dir", "unused"], "expected --guidance-scale to be a finite number, found nan"),
    (["likelihood", "--model", "analytic:ring", "--process", "VP", "--rtol", "inf"], "--rtol to be a finite number"),
    (["evaluate", "--model", "analytic:ring", "--process", "VP", "--num-samples", "0"],
     "expected --num-samples to be an integer >= 2, found 0"),
    (["evaluate", "--model", "analytic:ring", "--process", "VP", "--option", "foo=1"], "unknown option(s) 'foo'"),
    (["fit-grid", "toy2d", "--steps", "0"], "expected --steps to be an integer >= 1, found 0"),
    (["plot", "error-vs-nfe", "--csv", "nope.csv", "--output", "unused.png"], "nope.csv"),
])
def test_bad_values_are_usage_errors_in_every_command(capsys, tmp_path, monkeypatch, argv, found):
    monkeypatch.chdir(tmp_path)
    assert found in _error(capsys, argv)
    assert not (tmp_path / "unused").exists()


def test_a_bad_thread_variable_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setenv("SCORE_TOOLKIT_NUM_THREADS", "abc")
    assert "expected SCORE_TOOLKIT_NUM_THREADS to be an integer >= 0, found 'abc'" in _error(capsys, ["samplers"])


def test_evaluate_pictures_must_be_a_folder_and_reference_of_the_model_shape(capsys, tmp_path):
    import numpy as np

    (tmp_path / "d.txt").write_text("mine")
    np.save(tmp_path / "wrong.npy", np.zeros((10, 3)))
    ring = ["evaluate", "--model", "analytic:ring", "--process", "VP", "--num-samples", "4"]
    assert "found the file" in _error(capsys, [*ring, "--pictures", str(tmp_path / "d.txt")])
    assert "expected --reference samples of the model's shape (2,), found (3,)" in _error(
        capsys, [*ring, "--reference", str(tmp_path / "wrong.npy")])
    assert (tmp_path / "d.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["evaluate", "fit-grid", "restore"])
def test_a_damaged_model_is_exit_code_2_in_every_command(capsys, tmp_path, damaged_model, command):
    argv = {"evaluate": ["evaluate", "--model", damaged_model, "--reference", "ring"],
            "fit-grid": ["fit-grid", damaged_model],
            "restore": ["restore", "unused.png", "--checkpoint", damaged_model, "--task", "inpaint",
                        "--mask-kind", "right_half", "--output-dir", str(tmp_path / "out")]}[command]
    assert "corrupt the network config" in _error(capsys, argv)


# ------------------------------------------------------------------------------------------- files the tool did not write
def test_train_export_overwrite_never_deletes_foreign_files(capsys, tmp_path):
    folder = tmp_path / "exp1"
    shutil.copytree(shipped_model_path("toy2d"), folder)
    (folder / "NOTES.txt").write_text("mine")
    (folder / "extra").mkdir()
    (folder / "extra" / "x.txt").write_text("mine too")
    config = shipped_model_path("toy2d").parent / "configs" / "toy2d.yaml"
    err = _error(capsys, ["train", "--config", str(config), "--set", "train.steps=2", "--set", f"export.folder={folder}",
                          "--set", "export.overwrite=true", "--output-dir", str(tmp_path / "run")])
    assert "holds files an export does not write (NOTES.txt, extra/x.txt)" in err
    assert (folder / "NOTES.txt").read_text() == "mine" and (folder / "extra" / "x.txt").read_text() == "mine too"


def test_export_pipeline_overwrites_an_earlier_export_only(tmp_path):
    from score_toolkit import hub
    from score_toolkit.models import ScoreMLP
    from score_toolkit.processes import VPSDE

    model = ScoreMLP(2, hidden_dim=8, num_layers=1)
    folder = hub.export_pipeline(model, VPSDE(), "epsilon", "t", tmp_path / "out")
    (folder / "grids").mkdir()
    fitted = {"log_snr": [1.0, -1.0], "info": {"model_grid": {"weights_sha256": {}}, "pilot_grid": {}}}
    (folder / "grids" / "unipc_9.json").write_text(json.dumps(fitted))  # fit-grid's files belong to the export folder
    assert hub.foreign_export_files(folder) == []
    hub.export_pipeline(model, VPSDE(), "epsilon", "t", folder, overwrite=True)
    assert not (folder / "grids").exists()
    # files the export does not write, also inside its own subfolders, are never deleted
    (folder / "grids").mkdir()
    (folder / "grids" / "by_hand.json").write_text("{}")
    (folder / "unet" / "notes.txt").write_text("mine")
    (folder / "scheduler" / "scheduler_config.json.orig").write_text("mine")
    (folder / "data.npy").write_text("mine")
    (folder / "empty").mkdir()
    foreign = ["data.npy", "empty/", "grids/by_hand.json", "scheduler/scheduler_config.json.orig", "unet/notes.txt"]
    assert hub.foreign_export_files(folder) == foreign
    with pytest.raises(FileExistsError, match=r"holds files an export does not write \(data.npy, empty/, grids/by_hand"):
        hub.export_pipeline(model, VPSDE(), "epsilon", "t", folder, overwrite=True)
    assert all((folder / name).exists() for name in foreign) and (folder / "unet" / "notes.txt").read_text() == "mine"


@pytest.fixture
def digit_png(tmp_path):
    import numpy as np
    from PIL import Image

    path = tmp_path / "dig.png"
    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype("uint8")).save(path)
    return str(path)


def test_restore_refuses_foreign_files_and_replaces_its_own_with_overwrite(capsys, tmp_path, digit_png):
    out = tmp_path / "rsx"
    out.mkdir()
    (out / "restored.png").write_text("mine")
    argv = ["restore", digit_png, "--task", "inpaint", "--mask-kind", "right_half", "--steps", "3", "--num-samples", "1",
            "--output-dir", str(out), "-q"]
    assert "holds files restore did not write (restored.png)" in _error(capsys, argv)
    assert (out / "restored.png").read_text() == "mine"
    (out / "NOTES.txt").write_text("mine")
    assert main([*argv, "--overwrite"]) == 0
    assert "1 restoration (" in capsys.readouterr().out
    assert main(argv) == 0  # its own run with the same settings: replaced
    capsys.readouterr()
    assert "another restore run" in _error(capsys, [*argv[:-3], "--seed", "1", *argv[-3:]])
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.txt", "manifest.json", "restored.png",
                                                      "restored.safetensors"]


@pytest.mark.parametrize("extra, found", [
    (["--method", "repaint", "--sampler", "dpmpp_2m"], "--sampler applies to pigdm, dps and replacement"),
    (["--factor", "4"], "--factor applies to --task super_resolution, found --task inpaint"),
    (["--blur-std", "3"], "--blur-std applies to --task deblur, found --task inpaint"),
    (["--steps", "5", "--option", "num_steps=7"], "pass --steps or --option num_steps=..., not both"),
    (["--method", "imputation", "--noise-std", "0.1"], "--method imputation takes the observation as noise-free"),
])
def test_restore_refuses_options_that_do_not_apply(capsys, tmp_path, digit_png, extra, found):
    argv = ["restore", digit_png, "--task", "inpaint", "--mask-kind", "right_half", "--output-dir", str(tmp_path / "o")]
    assert found in _error(capsys, [*argv, *extra])
    assert not (tmp_path / "o").exists()


def test_evaluate_pictures_refuse_files_already_there(capsys, tmp_path):
    pic = tmp_path / "pic"
    pic.mkdir()
    (pic / "samples.png").write_text("mine")
    argv = ["evaluate", "--model", "analytic:ring", "--process", "VP", "--num-samples", "4", "--sampler",
            "euler_maruyama", "--option", "num_steps=2", "--pictures", str(pic), "-q"]
    assert "already holds samples.png" in _error(capsys, argv)
    assert (pic / "samples.png").read_text() == "mine"
    assert "pass --pictures" in _error(capsys, [*argv[:-3], "--overwrite"])
    assert main([*argv, "--overwrite"]) == 0
    capsys.readouterr()
    assert (pic / "samples.png").read_bytes().startswith(b"\x89PNG")


def test_sample_checks_foreign_image_files_before_sampling(capsys, tmp_path, monkeypatch):
    import score_toolkit.distributed as D

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the folder")

    monkeypatch.setattr(D, "write_shard", no_sampling)
    for foreign in ("samples.npz", "images/keep.png"):
        out = tmp_path / foreign.replace("/", "_")
        (out / "images").mkdir(parents=True)
        (out / foreign).write_text("mine")
        err = _error(capsys, ["sample", "--num-samples", "2", "--steps", "2", "--image-files", "--output-dir", str(out),
                              "--cpu", "-q"])
        assert "did not write" in err or "was not written by this run" in err
        assert (out / foreign).read_text() == "mine"


# ------------------------------------------------------------------------------------------- train
TOY2D = str(shipped_model_path("toy2d").parent / "configs" / "toy2d.yaml")


@pytest.mark.parametrize("extra, found", [
    (["--grid-fit-option", "foo=1", "--dry-run"], "unknown fit option(s) ['foo']"),
    (["--set", "seed=3", "--seed", "4"], "pass --seed or --set seed=..., not both"),
    (["--set", "output_dir=a", "--output-dir", "b"], "pass --output-dir or --set output_dir=..., not both"),
    (["--no-fit-grid", "--grid-pilot", "10"], "--grid-pilot applies to the grid fit that --no-fit-grid turns off"),
    (["--seed", "-1"], "expected --seed to be an integer >= 0"),
])
def test_train_option_conflicts_and_fit_options_are_checked_up_front(capsys, tmp_path, monkeypatch, extra, found):
    monkeypatch.chdir(tmp_path)
    assert found in _error(capsys, ["train", "--config", TOY2D, *extra])
    assert list(tmp_path.iterdir()) == []


def test_train_dry_run_leaves_no_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config exports to hub_cards/toy2d, relative
    assert main(["train", "--config", TOY2D, "--dry-run", "--output-dir", str(tmp_path / "tr1"), "-q"]) == 0
    assert "ok:" in capsys.readouterr().out
    assert not (tmp_path / "tr1").exists()


def test_quiet_and_verbose_together_are_refused(capsys):
    assert "pass -q (fewer messages) or -v (more), not both" in _error(capsys, ["samplers", "-q", "-v"])
