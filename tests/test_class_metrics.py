"""Class-conditional digits: the per-class report (share classified as requested, Frechet distance, their floors),
its model-card results (one per class, none overwriting another), and the shipped class-conditional model sampled
and evaluated by name from any directory."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard

from score_toolkit import hub
from score_toolkit.conditioning.class_metrics import class_floors, class_sample_counts, evaluate_digits_classes
from score_toolkit.digits_classifier import load_digits_classifier
from score_toolkit.evaluation import _real_digits, frechet_distance

pytest.importorskip("sklearn")


def _even_odd(c):
    images, targets = _real_digits()
    idx = torch.arange(len(targets))
    return images, idx[(targets == c) & (idx % 2 == 0)], idx[(targets == c) & (idx % 2 == 1)]


def test_real_digits_of_a_class_score_their_floor_exactly():
    """The floor's own set (the even half of a class) judged as samples gives the floor; the odd half (the reference
    itself) gives distance 0; asking for the wrong class gives the share labelled as that class."""
    images, even3, odd3 = _even_odd(3)
    _, even7, _ = _even_odd(7)
    x = torch.cat([images[even3], images[even7]])
    requested = torch.cat([torch.full((len(even3),), 3), torch.full((len(even7),), 7)])
    rep = evaluate_digits_classes(x, requested, nfe=0, wall_time_s=0.0)
    floors = class_floors()
    assert [r["class"] for r in rep.rows] == [3, 7]
    for r in rep.rows:
        assert r["frechet_distance"] == pytest.approx(floors[r["class"]]["frechet_distance"], rel=1e-9)
        assert r["accuracy"] == floors[r["class"]]["accuracy"] and r["num_samples"] == r["floor_size"]
    assert rep.rows[0]["frechet_floor"] > 1.0  # about 90 images in 64 features: a large small-sample floor
    assert class_sample_counts()[3] == len(even3) and floors[3]["reference_size"] == len(odd3)
    same = evaluate_digits_classes(images[odd3], torch.full((len(odd3),), 3), nfe=0, wall_time_s=0.0)
    assert same.rows[0]["frechet_distance"] < 1e-6
    # the 3s asked for as 5s: hardly any is labelled 5; 3s vs the real 5s are far apart
    wrong = evaluate_digits_classes(images[even3], torch.full((len(even3),), 5), nfe=0, wall_time_s=0.0)
    assert wrong.accuracy < 0.05 and wrong.rows[0]["frechet_distance"] > 5 * floors[5]["frechet_distance"]
    # the overall share pools the samples
    assert rep.accuracy == pytest.approx(sum(r["accuracy"] * r["num_samples"] for r in rep.rows) / len(x))
    f = class_floors()[9]
    _, e9, o9 = _even_odd(9)
    _, _, feats = load_digits_classifier().predict(images[torch.cat([e9, o9])])
    assert f["frechet_distance"] == pytest.approx(frechet_distance(feats[:len(e9)], feats[len(e9):]), rel=1e-12)


def test_class_report_errors():
    images, even3, _ = _even_odd(3)
    x = images[even3[:4]]
    with pytest.raises(ValueError, match="one requested class per sample"):
        evaluate_digits_classes(x, torch.tensor([3, 3]), nfe=0, wall_time_s=0.0)
    with pytest.raises(ValueError, match=r"requested classes in 0..9, found \[10\]"):
        evaluate_digits_classes(x, torch.tensor([3, 3, 3, 10]), nfe=0, wall_time_s=0.0)
    with pytest.raises(ValueError, match="at least 2 samples of class 4"):
        evaluate_digits_classes(x, torch.tensor([3, 3, 3, 4]), nfe=0, wall_time_s=0.0)
    with pytest.raises(ValueError, match=r"shape \(n, 1, 8, 8\)"):
        evaluate_digits_classes(x[:, 0], torch.tensor([3, 3, 3, 3]), nfe=0, wall_time_s=0.0)


def test_per_class_card_results_do_not_overwrite_each_other(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nscore_toolkit:\n  data: digits\n---\n\n# m\n")
    images, even3, _ = _even_odd(3)
    _, even7, _ = _even_odd(7)
    x = torch.cat([images[even3], images[even7]])
    requested = torch.cat([torch.full((len(even3),), 3), torch.full((len(even7),), 7)])
    rep = evaluate_digits_classes(x, requested, nfe=25, wall_time_s=1.0, details={"guidance_scale": 2.0})
    hub.update_model_card(folder, rep.card_results(settings={"seed": 0}, command="score-toolkit evaluate x"))
    hub.update_model_card(folder, [{"type": "frechet_distance", "name": "unconditional", "value": 9.0}])
    results = ModelCard.load(folder / "README.md").data.eval_results
    assert len(results) == 1 + 2 * 2 + 1
    by = {(r.metric_type, (r.metric_args or {}).get("class_label")): r for r in results}
    assert by[("requested_class_accuracy", "classes 3,7")].metric_value == pytest.approx(rep.accuracy, rel=1e-4)
    assert by[("frechet_distance", 7)].metric_args["guidance_scale"] == 2.0
    assert "(noise floor" in by[("frechet_distance", 3)].metric_name
    # measuring class 3 again replaces class 3's results only
    again = evaluate_digits_classes(images[even3], torch.full((len(even3),), 3), nfe=25, wall_time_s=1.0,
                                    details={"guidance_scale": 2.0})
    hub.update_model_card(folder, again.card_results(command="score-toolkit evaluate y"))
    results = ModelCard.load(folder / "README.md").data.eval_results
    assert len(results) == 1 + 2 * 2 + 1 + 1  # plus the overall share of "classes 3..3"
    # another guidance scale is another measurement
    hub.update_model_card(folder, rep.card_results(settings={"guidance_scale": 3.0}, command="score-toolkit evaluate z"))
    assert len(ModelCard.load(folder / "README.md").data.eval_results) == 2 * (1 + 2 * 2) + 1 + 1
    assert {r.metric_type for r in results} <= set(hub.MODEL_MEASUREMENTS)


def _shipped():
    from score_toolkit.pipeline import shipped_model_path

    try:
        return shipped_model_path("digits_class_conditional")
    except FileNotFoundError:
        pytest.skip("the shipped class-conditional digits model is not in this checkout")


def test_sample_the_shipped_class_conditional_model_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    """`score-toolkit sample --model digits_class_conditional --class-label 3 --guidance-scale 2` from another
    directory: the samples are 3s by the shipped classifier."""
    from safetensors.torch import load_file

    from score_toolkit.cli import main

    _shipped()
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--model", "digits_class_conditional", "--class-label", "3", "--guidance-scale", "2",
                 "--num-samples", "4", "--output-dir", "s", "-q"]) == 0
    x = load_file(tmp_path / "s" / "samples.safetensors")["samples"]
    assert x.shape == (4, 1, 8, 8)
    labels = load_digits_classifier().predict(x.clamp(-1, 1))[0]
    assert (labels == 3).sum() >= 3, labels
    assert main(["sample", "digits", "--model", "digits_class_conditional", "--output-dir", "t"]) == 2
    assert "pass the model once" in capsys.readouterr().err


def test_evaluate_per_class_on_the_shipped_model_and_its_errors(tmp_path, monkeypatch, capsys):
    from score_toolkit.cli import main

    _shipped()
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--model", "digits_class_conditional", "--sampler", "dpmpp_2m", "--option",
                 "num_steps=3", "--class-label", "3", "--guidance-scale", "2", "--num-samples", "3",
                 "--output", "r.json", "-q"]) == 0
    out = capsys.readouterr().out
    assert "| 3 | 3 |" in out and (tmp_path / "r.json").is_file()
    for argv, message in (
        (["--class-label", "12"], "a class 0..9 or 'each', found '12'"),
        (["--class-label", "three"], "a class 0..9 or 'each'"),
        (["--guidance-scale", "2"], "--guidance-scale needs --class-label"),
    ):
        assert main(["evaluate", "--model", "digits_class_conditional", *argv, "--num-samples", "2", "-q"]) == 2
        assert message in capsys.readouterr().err
    # a network without labels
    assert main(["evaluate", "--model", "digits", "--class-label", "3", "--num-samples", "2", "--option",
                 "num_steps=2", "--sampler", "dpmpp_2m", "-q"]) == 1
    assert "built without class labels" in capsys.readouterr().err


def test_export_of_a_label_conditional_network_says_how_to_sample_a_class(tmp_path):
    """The card and model_index.json of a network with a label table: DDPMPipeline cannot run it (it passes no
    labels), the card's snippet samples a class with ScorePipeline, and that snippet runs."""
    import json

    from score_toolkit.models import ScoreMLP
    from score_toolkit.processes import VPSDE

    torch.manual_seed(0)
    net = ScoreMLP(2, hidden_dim=8, num_layers=1, num_classes=4)
    assert hub.label_classes(net) == 3 and hub.label_classes(ScoreMLP(2, hidden_dim=8, num_layers=1)) is None
    folder = hub.export_pipeline(net, VPSDE(), "epsilon", "t", tmp_path / "m",
                                 {"model_name": "toy", "dataset_name": "ring", "results": []})
    assert json.loads((folder / "model_index.json").read_text())["_sampling"] == hub.SAMPLING_NOTE_LABELS
    text = (folder / "README.md").read_text()
    assert "classes 0..2 and the null label 3" in text and "class_labels=2, guidance_scale=2.0" in text
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0].replace("path/to/this/folder", str(folder))
    scope: dict = {}
    exec(snippet, scope)  # the card's own example, verbatim but for the folder
    assert scope["out"].samples.shape == (16, 2)
