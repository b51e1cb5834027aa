"""The first mistakes of someone new to the commands: a misspelt command, option or model name, a device this machine
does not have, a sampler that does not fit the command, Ctrl-C. Each gets one line on stderr that says what was
expected and what was found (the closest names where there are some), exit code 2 (130 for Ctrl-C), no traceback."""

from __future__ import annotations

import pytest

from score_toolkit.cli import main

RING = ["likelihood", "--model", "analytic:ring", "--process", "VP", "--num-samples", "4", "-q"]
NO_SUCH_GPU = "cuda:99"  # no machine this runs on has 100 GPUs


def _error(capsys, argv) -> str:
    """A refused command: exit code 2, an ``error:`` line on stderr, nothing on stdout, no traceback."""
    assert main(argv) == 2, argv
    out, err = capsys.readouterr()
    assert out == "" and "error:" in err and "Traceback" not in err, (out, err)
    return err


def _parser_error(capsys, argv) -> str:
    """A command line argparse refuses: SystemExit(2) and the message on stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, command, hint", [
    (["sample", "--output_dir", "x"], "sample", "--output_dir: did you mean --output-dir?"),
    (["sample", "--num_samples=8"], "sample", "--num_samples: did you mean --num-samples?"),
    (["samplers", "--jsn"], "samplers", "--jsn: did you mean --json?"),
    (["plot", "error-vs-nfe", "--csv", "a.csv", "--output", "b.png", "--linear_y"], "plot error-vs-nfe",
     "--linear_y: did you mean --linear-y?"),
])
def test_a_misspelt_option_is_named_by_its_command_with_the_close_one(capsys, argv, command, hint):
    err = _parser_error(capsys, argv)
    assert f"score-toolkit {command}: error: unrecognized argument" in err and hint in err, err
    assert f"see score-toolkit {command} --help" in err


def test_a_misspelt_command_names_the_close_ones(capsys):
    err = _parser_error(capsys, ["samplr"])
    assert "unknown command 'samplr'; did you mean 'samplers'" in err and "fit-grid" in err, err


@pytest.mark.parametrize("argv", [["likelihood", "--model", "digit", "--data", "digits"],
                                  ["evaluate", "--model", "digit", "--sampler", "unipc"],
                                  ["fit-grid", "digit"]])
def test_a_misspelt_model_name_names_the_shipped_one(capsys, argv):
    err = _error(capsys, argv)
    assert "found no folder at digit" in err and "did you mean 'digits'?" in err, err


@pytest.mark.parametrize("extra, found", [
    (["--sampler", "unipcc"], "unknown sampler 'unipcc'. Did you mean 'unipc'?"),
    (["--sampler", "ancestral"], "expected --sampler to be a deterministic fixed-grid sampler (e.g. 'unipc'), found "
                                 "'ancestral'"),
    (["--option", "num_step=3"], "unknown option(s) 'num_step' (did you mean 'num_steps'?)"),
    (["--option", "grid=karras"], "--option grid: not an option here"),
    (["--fit-option", "iteration=3"], "unknown fit option(s) ['iteration']"),
    (["--device", "cpux"], "expected --device cpu, cuda, cuda:1, ..., found 'cpux'"),
    (["--device", NO_SUCH_GPU], f"--device {NO_SUCH_GPU}: no such CUDA device on this machine"),
])
def test_fit_grid_refuses_what_it_cannot_fit_before_any_work(capsys, extra, found):
    assert found in _error(capsys, ["fit-grid", "toy2d", "-q", *extra])


@pytest.mark.parametrize("argv", [[*RING, "--device", NO_SUCH_GPU],
                                  ["evaluate", "--model", "analytic:ring", "--process", "VP", "--sampler", "unipc",
                                   "--num-samples", "4", "-q", "--device", NO_SUCH_GPU],
                                  [*RING, "--device", "gpu"]])
def test_a_device_this_machine_does_not_have_is_a_usage_error(capsys, argv):
    err = _error(capsys, argv)
    assert "no such CUDA device on this machine" in err or "found 'gpu'" in err, err


def test_demo_counts_say_what_they_found(capsys):
    assert "expected --steps to be an integer >= 1, found 0" in _error(capsys, ["demo", "--steps", "0"])
    assert "expected --num-samples to be an integer >= 1, found -2" in _error(capsys, ["demo", "--num-samples", "-2"])


def test_ctrl_c_is_one_line_and_exit_code_130(capsys, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("score_toolkit.demo.run_demo", interrupted)
    assert main(["demo", "--output", str(tmp_path / "demo.png")]) == 130
    out, err = capsys.readouterr()
    assert err.strip() == "score-toolkit demo: interrupted" and out == "", (out, err)
    monkeypatch.setattr("score_toolkit.training.train", interrupted)
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\ndata: {{name: ring}}\nprocess: {{name: VPSDE}}\n"
                      "model: {name: ScoreMLP}\nobjective: {name: continuous_dsm}\ntrain: {steps: 2, cpu: true}\n")
    code = main(["train", "--config", str(config), "-q"])
    out, err = capsys.readouterr()
    assert code == 130 and "score-toolkit train: interrupted" in err and "--resume" in err, (code, out, err)
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, flag", [
    (["sample", "toy2d", "--sampler", "pf_ode", "--steps", "7"], "--steps"),
    (["sample", "toy2d", "--sampler", "pf_ode", "--option", "num_steps=7"], "--option num_steps"),
    (["evaluate", "--model", "toy2d", "--sampler", "pf_ode", "--option", "num_steps=7"], "--option num_steps"),
])
def test_a_step_count_an_adaptive_sampler_would_ignore_is_refused(capsys, tmp_path, argv, flag):
    out = tmp_path / "out"
    err = _error(capsys, [*argv, "--num-samples", "4", *(["--output-dir", str(out)] if argv[0] == "sample" else [])])
    assert f"{flag} has no effect on sampler 'pf_ode' with method 'dopri5'" in err and "method=rk4" in err, err
    assert not out.exists()


def test_a_fixed_grid_method_takes_the_step_count_and_says_nothing_of_grids(capsys, tmp_path, caplog):
    caplog.set_level("INFO")
    argv = ["sample", "toy2d", "--sampler", "pf_ode", "--option", "method=rk4", "--steps", "3", "--num-samples", "4",
            "--output-dir", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 0
    assert "pf_ode (method=rk4, num_steps=3)" in capsys.readouterr().out
    assert "fixed-grid" not in caplog.text and "built-in grid" not in caplog.text, caplog.text
