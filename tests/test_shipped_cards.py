"""Every model card in hub_cards/ loads with huggingface_hub's ModelCard and its model-index (eval_results) holds
measurements of the model only; the digits card's measurements were written by commands."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from score_toolkit import hub

REPO = Path(__file__).resolve().parent.parent
CARDS = sorted(p for p in (REPO / "hub_cards").glob("*/README.md"))


def test_the_shipped_cards_are_found():
    assert {p.parent.name for p in CARDS} >= {"toy2d", "digits", "digits_classifier"}


@pytest.mark.parametrize("path", CARDS, ids=[p.parent.name for p in CARDS])
def test_shipped_card_loads_and_its_model_index_holds_only_model_measurements(path):
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers"  # every shipped folder is written by diffusers' save_pretrained
    assert data.get("license") == "apache-2.0"
    results = card.data.eval_results
    assert results, f"{path}: no model-index"
    for r in results:
        assert r.metric_type in hub.MODEL_MEASUREMENTS, (path, r.metric_type)
        assert not r.metric_type.endswith("_floor") and r.metric_type not in ("training_loss", "nfe")
        assert not (r.metric_name or "").lower().startswith(("noise floor", "floor", "final training loss"))
        assert isinstance(r.metric_value, (int, float)) and math.isfinite(r.metric_value)
        # none of the shipped data sets has a Hub dataset id: the results name them by their score_toolkit name
        assert r.dataset_type in ("digits", "ring"), r.dataset_type
    # no invented Hub dataset id; the text says why
    assert "datasets" not in data
    assert "no dataset id on the Hugging Face Hub" in card.text
    if path.parent.name == "digits_classifier":
        assert data["pipeline_tag"] == "image-classification"
        assert [r.metric_type for r in results] == ["accuracy"]
    else:
        assert hub.RESULTS_BEGIN in card.text and hub.RESULTS_END in card.text  # the table is generated
        for r in results:  # every measurement says which command made it
            assert (r.metric_args or {}).get("command", "").startswith("score-toolkit "), r


def test_digits_card_measurements_come_from_commands():
    """The Frechet distance, confidence, class histogram and bits/dim of the digits card were written by
    `score-toolkit evaluate/likelihood --update-card`, not by hand."""
    card = ModelCard.load(REPO / "hub_cards" / "digits" / "README.md")
    by_type = {r.metric_type: r for r in card.data.eval_results}
    assert card.data.pipeline_tag == "unconditional-image-generation"
    for kind in ("frechet_distance", "mean_confidence", "class_histogram_tv"):
        command = by_type[kind].metric_args["command"]
        assert command.startswith("score-toolkit evaluate --model hub_cards/digits") and \
            "--update-card hub_cards/digits" in command, command
    command = by_type["bits_per_dim"].metric_args["command"]
    assert command.startswith("score-toolkit likelihood --model hub_cards/digits") and "--update-card" in command
    assert "(noise floor" in by_type["frechet_distance"].metric_name


