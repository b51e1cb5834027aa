"""What every command shares: help texts, one spelling per thing, -v/-q, the thread policy, shipped models by name."""

from __future__ import annotations

import argparse
import logging
import os

import pytest
import torch

from score_toolkit.cli import build_parser, main
from score_toolkit.cli._common import OPTION_HELP, parse_options, parse_value, resolve_model
from score_toolkit.pipeline import shipped_model_path
from score_toolkit.threads import ENV_VAR, cpu_threads, policy_threads


def _subparsers(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from _subparsers(sub, f"{prefix}{name} ")


COMMANDS = dict(_subparsers(build_parser()))


def _options(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in sub._actions for s in a.option_strings}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help_text(name):
    sub = COMMANDS[name]
    missing = [a.option_strings or a.dest for a in sub._actions
               if a.help is None or (a.help != argparse.SUPPRESS and not a.help.strip())]
    assert not missing, f"score-toolkit {name}: options without help text: {missing}"
    text = sub.format_help()
    for raw in (":mod:", ":func:", "``"):  # reST markup does not belong in a terminal
        assert raw not in text, f"score-toolkit {name} --help shows raw reST {raw!r}"


def test_the_same_things_have_the_same_names():
    """--output-dir is a folder, --output a file, --option a sampler option, and --seed, --device, --dtype, -v, -q,
    --threads mean the same in every command that has them."""
    commands = {n: _options(s) for n, s in COMMANDS.items() if n != "plot"}  # "plot" only chooses a KIND
    for name, opts in commands.items():
        assert {"-v", "-q", "--threads"} <= set(opts), name
        assert "--out" not in opts or opts["--out"].help == argparse.SUPPRESS, name
    for name in ("sample", "train", "likelihood", "evaluate", "demo"):
        assert "--seed" in commands[name], f"{name} has no --seed"
    for name in ("sample", "train", "likelihood", "evaluate"):
        assert "--device" in commands[name], f"{name} has no --device"
    for name in ("likelihood", "evaluate"):
        assert "--dtype" in commands[name]
    assert "--output-dir" in commands["sample"] and "--output-dir" in commands["train"]
    for name in ("demo", "likelihood", "evaluate", "plot error-vs-nfe"):
        assert "--output" in _options(COMMANDS[name]), name
    helps = {_options(COMMANDS[n])["--option"].help for n in ("sample", "evaluate")}
    assert helps == {OPTION_HELP}


def test_option_values_have_one_syntax():
    assert parse_options(["num_steps=50", "rtol=1e-3", "denoise=true", "grid=log_sigma", "t=[1, 2]", "s=[a, b]"]) == {
        "num_steps": 50, "rtol": 1e-3, "denoise": True, "grid": "log_sigma", "t": [1, 2], "s": ["a", "b"]}
    assert parse_value("") == "" and parse_value("a: b: c") == "a: b: c"
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["num_steps"])
    with pytest.raises(ValueError, match="given twice"):
        parse_options(["a=1", "a=2"])


def test_bad_option_is_exit_code_2_in_both_commands(capsys):
    assert main(["sample", "--option", "num_steps", "--output-dir", "unused"]) == 2
    assert main(["evaluate", "--model", "analytic:ring", "--process", "VP", "--option", "num_steps"]) == 2
    assert capsys.readouterr().err.count("expected --option KEY=VALUE") == 2


# ------------------------------------------------------------------------------------------- thread policy
def test_policy_default_env_and_errors(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert policy_threads() == 1 and policy_threads(3) == 3 and policy_threads(0) == 0
    monkeypatch.setenv(ENV_VAR, "2")
    assert policy_threads() == 2 and policy_threads(1) == 1
    monkeypatch.setenv(ENV_VAR, "two")
    with pytest.raises(ValueError, match=ENV_VAR):
        policy_threads()
    with pytest.raises(ValueError, match="threads"):
        policy_threads(-1)


def test_cpu_threads_sets_restores_and_the_outer_block_decides(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    before = torch.get_num_threads()
    with cpu_threads(3) as n:
        assert n == 3 == torch.get_num_threads()
        with cpu_threads(1):
            assert torch.get_num_threads() == 3  # the outer block decides
    assert torch.get_num_threads() == before
    with cpu_threads(0):
        assert torch.get_num_threads() == before  # 0: torch's own setting
    with cpu_threads(2, device="meta"):
        assert torch.get_num_threads() == before  # not a CPU device
    with pytest.raises(RuntimeError), cpu_threads(2):
        raise RuntimeError
    assert torch.get_num_threads() == before


def test_sampler_runs_under_the_policy(monkeypatch):
    from score_toolkit import VPSDE, get_sampler, ring_mixture

    process = VPSDE()
    seen = []

    def run():
        get_sampler("euler_maruyama", num_steps=2).sample(ring_mixture().score_fn(process), process, shape=(4, 2),
                                                          callback=lambda info: seen.append(torch.get_num_threads()))

    monkeypatch.delenv(ENV_VAR, raising=False)
    before = torch.get_num_threads()
    with cpu_threads(0):  # pretend torch's default is 3 threads
        torch.set_num_threads(3)
    try:
        run()
        assert set(seen) == {1}
        monkeypatch.setenv(ENV_VAR, "2")
        seen.clear()
        run()
        assert set(seen) == {2}
        monkeypatch.setenv(ENV_VAR, "0")
        seen.clear()
        run()
        assert set(seen) == {3}
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- -v / -q, progress
def test_quiet_and_verbose_demo(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    argv = ["demo", "--output", str(tmp_path / "d.png"), "--steps", "30", "--num-samples", "200", "--sampler",
            "dpmpp_2m"]
    assert main([*argv, "-q"]) == 0
    quiet = capsys.readouterr()
    assert "sliced W2" in quiet.out  # the result
    assert "training a score network" not in quiet.err and "train:" not in quiet.err and "%|" not in quiet.err
    assert main(argv) == 0
    normal = capsys.readouterr()
    assert "score_toolkit.demo: training a score network" in normal.err  # the log line
    assert "%|" in normal.err  # a tqdm bar
    assert logging.getLogger("score_toolkit").handlers == []  # the command removed its handler again


def test_quiet_restore_shows_no_progress_bar(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype("uint8")).save(tmp_path / "dig.png")
    argv = ["restore", str(tmp_path / "dig.png"), "--task", "inpaint", "--mask-kind", "right_half", "--steps", "3",
            "--num-samples", "1", "--output-dir", str(tmp_path / "r"), "--overwrite"]
    assert main([*argv, "-q"]) == 0
    quiet = capsys.readouterr()
    assert "1 restoration (" in quiet.out and "|" not in quiet.err, quiet.err  # the result, no bar
    assert main(argv) == 0
    assert "3/3" in capsys.readouterr().err  # without -q: the sampler's steps


def test_warnings_of_the_command_name_the_command(tmp_path, capsys, monkeypatch):
    """Run as the command (argv from the shell), a library warning is printed as the command's (the first frame
    outside the library would be the console script's ``sys.exit(main())``); called with an argv list from Python,
    it stays a Python warning that callers can record."""
    import warnings

    from score_toolkit.models import CheckpointDtypeWarning, ScoreMLP
    from score_toolkit.pipeline import ScorePipeline
    from score_toolkit.processes import VPSDE
    from score_toolkit.schedulers import scheduler_for

    unet = ScoreMLP(2, hidden_dim=8, num_layers=1).to(torch.float64)  # float64 weights load as float32, with a warning
    ScorePipeline(unet=unet, scheduler=scheduler_for(VPSDE(), "epsilon", "t")).save_pretrained(tmp_path / "m")
    argv = ["sample", str(tmp_path / "m"), "--num-samples", "2", "--steps", "2", "--output-dir", str(tmp_path / "o"),
            "-q"]
    monkeypatch.setattr("sys.argv", ["score-toolkit", *argv])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main() == 0
    err = capsys.readouterr().err
    assert "score-toolkit sample: warning: " in err and "(CheckpointDtypeWarning)" in err, err
    assert not [w for w in seen if issubclass(w.category, CheckpointDtypeWarning)]  # printed, not passed on
    monkeypatch.setattr("sys.argv", ["score-toolkit", *argv, "-q", "--overwrite"])  # -qq: errors only
    assert main() == 0
    assert "warning" not in capsys.readouterr().err.lower()
    with pytest.warns(CheckpointDtypeWarning):
        assert main([*argv, "--overwrite"]) == 0


# ------------------------------------------------------------------------------------------- shipped models
def test_shipped_models_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    digits = str(shipped_model_path("digits"))
    assert resolve_model("digits") == digits
    assert resolve_model("hub_cards/digits") == digits
    assert resolve_model("analytic:ring") == "analytic:ring"
    assert resolve_model("user/some-repo") == "user/some-repo"  # a Hub id stays one
    os.mkdir("digits")  # a folder of the user's own wins over the shipped model
    assert resolve_model("digits") == "digits"


@pytest.mark.slow
def test_likelihood_and_sample_find_shipped_models_from_another_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["likelihood", "--model", "hub_cards/digits", "--data", "digits", "--num-samples", "2",
                 "--method", "euler", "--num-steps", "2", "-q"]) == 0
    assert "UNet2DModel from " + str(shipped_model_path("digits")) in capsys.readouterr().out
    assert main(["sample", "toy2d", "--num-samples", "4", "--batch-size", "4", "--steps", "3", "--output-dir", "s",
                 "-q"]) == 0
    out = capsys.readouterr().out
    assert "manifest.json" in out and (tmp_path / "s" / "manifest.json").is_file()


# ------------------------------------------------------------------------------------------- pipeline progress
def test_pipeline_progress_bar_follows_diffusers_config(tmp_path, capsys):
    from accelerate import Accelerator

    from score_toolkit.distributed import sample_to_folder
    from score_toolkit.models import ScoreMLP
    from score_toolkit.pipeline import ScorePipeline
    from score_toolkit.processes import VPSDE
    from score_toolkit.schedulers import scheduler_for

    torch.manual_seed(0)
    pipe = ScorePipeline(unet=ScoreMLP(2, hidden_dim=8, num_layers=1), scheduler=scheduler_for(VPSDE(), "epsilon", "t"))
    steps = []
    pipe(4, sampler="euler_maruyama", num_steps=3, callback=lambda info: steps.append(info["step"]))
    assert len(steps) == 3  # the user's callback still sees every step
    assert "3/3" in capsys.readouterr().err  # diffusers' bar over the sampler's steps
    pipe.set_progress_bar_config(disable=True)
    pipe(4, sampler="euler_maruyama", num_steps=3)
    assert "3/3" not in capsys.readouterr().err
    pipe.set_progress_bar_config(desc="mine")
    sample_to_folder(pipe, tmp_path / "s", 4, sampler="euler_maruyama", sampler_options={"num_steps": 3},
                     batch_size=2, accelerator=Accelerator(cpu=True), progress=False)
    assert "3/3" not in capsys.readouterr().err  # no bar per batch inside a folder run
    assert pipe._progress_bar_config == {"desc": "mine"}  # and the user's configuration is back
