"""Model cards by the Hub's conventions: results that are not measurements of the model are refused;
`evaluate --update-card` writes its results through huggingface_hub's ModelCard; the templates ship inside the
package (and the wheel). The shipped cards themselves: tests/test_shipped_cards.py."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from score_toolkit import hub
from score_toolkit.processes import VPSDE

REPO = Path(__file__).resolve().parent.parent
# ------------------------------------------------------------------------------------ results and updates
def test_check_result_refuses_what_is_not_a_measurement():
    ok = hub.check_result({"type": "sliced_wasserstein", "name": "sliced W2", "value": 0.2, "floor": 0.1,
                           "settings": {"sampler": {"num_steps": 5}}})
    assert ok["floor"] == 0.1 and ok["settings"] == {"sampler": {"num_steps": 5}}
    for bad, match in (
        ({"type": "training_loss", "name": "loss", "value": 1.0}, "not a measurement"),
        ({"type": "energy_distance_floor", "name": "x", "value": 1.0}, "not a measurement"),
        ({"type": "sliced_wasserstein", "name": "noise floor: sliced W2", "value": 1.0}, "not a measurement"),
        ({"type": "nfe", "name": "score evaluations", "value": 501}, "not a measurement"),
        ({"type": "mmd", "name": "MMD", "value": math.nan}, "finite number"),
        ({"type": "mmd", "name": "MMD", "value": True}, "finite number"),
        ({"type": "mmd", "name": "MMD", "value": 1.0, "floor": "low"}, "floor"),
        ({"type": "mmd", "name": "MMD", "value": 1.0, "colour": "red"}, "unknown key"),
        ({"type": "", "name": "MMD", "value": 1.0}, "non-empty"),
    ):
        with pytest.raises(ValueError, match=match):
            hub.check_result(bad)
    with pytest.raises(TypeError, match="mapping"):
        hub.check_result(["mmd", 1.0])


def _exported(tmp_path, results=None):
    torch.manual_seed(0)
    from score_toolkit.models import ScoreMLP

    info = {"model_name": "toy", "dataset_name": "ring", "dataset_description": "ring of 8 Gaussians",
            "results": results or [{"type": "sliced_wasserstein", "name": "sliced W2 to 10 points", "value": 0.5,
                                    "floor": 0.25, "command": "score-toolkit train --config a.yaml"}]}
    return hub.export_pipeline(ScoreMLP(2, hidden_dim=8, num_layers=1), VPSDE(), "epsilon", "t", tmp_path / "m", info)


def test_update_model_card_replaces_adds_and_rerenders(tmp_path):
    folder = _exported(tmp_path)
    before = (folder / "README.md").read_text()
    hub.update_model_card(folder, [
        {"type": "sliced_wasserstein", "name": "sliced W2 to 20 points", "value": 0.4, "command": "score-toolkit evaluate x"},
        {"type": "mmd", "name": "MMD to 20 points", "value": 0.01, "floor": 0.02, "settings": {"seed": 3},
         "command": "score-toolkit evaluate x"},
    ])
    card = ModelCard.load(folder / "README.md")
    got = [(r.metric_type, r.metric_value, r.metric_name) for r in card.data.eval_results]
    assert got == [("sliced_wasserstein", 0.4, "sliced W2 to 20 points"),
                   ("mmd", 0.01, "MMD to 20 points (noise floor 0.02)")]
    assert all(r.dataset_type == "ring" and r.task_type == "unconditional-generation" for r in card.data.eval_results)
    text = card.text
    assert text.count(hub.RESULTS_BEGIN) == 1 and "sliced W2 to 10 points" not in text
    assert "| MMD to 20 points (noise floor 0.02) | 0.01 | seed=3 | [1] |" in text
    # everything outside the generated block is kept as it was
    assert text.split(hub.RESULTS_BEGIN)[0] == before.split(hub.RESULTS_BEGIN)[0].split("\n---\n", 1)[1]
    assert text.split(hub.RESULTS_END)[1] == before.split(hub.RESULTS_END)[1]
    # a card without the generated block gets a results section appended
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "README.md").write_text("---\nlicense: mit\nscore_toolkit:\n  data: moons\n---\n\n# A model\n\nText.\n")
    hub.update_model_card(plain, [{"type": "energy_distance", "name": "energy distance", "value": 0.3}])
    card = ModelCard.load(plain / "README.md")
    assert card.data.eval_results[0].dataset_type == "moons" and card.data.license == "mit"
    assert card.text.startswith("\n# A model\n\nText.\n\n## Results\n\n" + hub.RESULTS_BEGIN)
    with pytest.raises(FileNotFoundError, match="model card"):
        hub.update_model_card(tmp_path / "nothing", [{"type": "mmd", "name": "m", "value": 1.0}])
    with pytest.raises(ValueError, match="at least one result"):
        hub.update_model_card(folder, [])
    with pytest.raises(ValueError, match="not a measurement"):
        hub.update_model_card(folder, [{"type": "nfe", "name": "n", "value": 3}])
    assert ModelCard.load(folder / "README.md").data.eval_results[0].metric_value == 0.4  # unchanged by the refusal


def test_evaluate_update_card_writes_the_report_into_the_card(tmp_path, capsys):
    from score_toolkit.cli import main

    folder = _exported(tmp_path)
    argv = ["evaluate", "--model", str(folder), "--reference", "ring", "--num-samples", "50", "--sampler", "dpmpp_2m",
            "--option", "num_steps=3", "--update-card", str(folder)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    card = ModelCard.load(folder / "README.md")
    by_type = {r.metric_type: r for r in card.data.eval_results}
    assert {"sliced_wasserstein", "energy_distance", "mmd", "coverage", "density"} <= set(by_type)
    sw = by_type["sliced_wasserstein"]
    assert sw.metric_args["command"] == "score-toolkit " + " ".join(argv)
    assert sw.metric_args["nfe"] == 4 and sw.metric_args["num_samples"] == 50 and sw.metric_args["seed"] == 0  # 3 steps + the default to_zero step
    assert "(noise floor" in sw.metric_name
    # the value written is the value printed
    row = next(line for line in printed.splitlines() if line.startswith("| sliced_w2 |"))
    assert float(row.split("|")[2]) == pytest.approx(sw.metric_value, rel=1e-3)
    # no card there: a usage error before any sampling
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "--model", str(folder), "--reference", "ring", "--update-card", str(empty)]) == 2
    assert "expected a model card" in capsys.readouterr().err
    assert main(["likelihood", "--model", str(folder), "--data", "ring", "--update-card", str(folder)]) == 2
    assert "--levels or --bits" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ templates in the package
def test_templates_ship_inside_the_package():
    assert hub.TEMPLATES_DIR == Path(hub.__file__).parent / "templates"
    assert {p.name for p in hub.TEMPLATES_DIR.glob("*.md")} == {"score_model.md", "digits_classifier.md"}
    assert not (REPO / "hub_cards" / "templates").exists()


def test_the_wheel_carries_the_templates(tmp_path):
    """Built from a copy of the sources (a build writes build/ and *.egg-info next to them)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "score_toolkit", src / "score_toolkit", ignore=shutil.ignore_patterns("__pycache__"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("score_toolkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"score_toolkit/templates/score_model.md", "score_toolkit/templates/digits_classifier.md"} <= names
