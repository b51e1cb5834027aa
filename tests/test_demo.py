"""The main job (`score-toolkit demo`): it trains, samples and writes the PNG; at full length its
samples are close to exact samples."""

import pytest
from PIL import Image

from score_toolkit.cli import main
from score_toolkit.demo import run_demo


def test_demo_cli_writes_png(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--output", str(out), "--steps", "60", "--num-samples", "300"]) == 0
    img = Image.open(out)
    assert img.width > 2 * img.height  # three panels side by side
    printed = capsys.readouterr().out
    assert "sliced W2" in printed and "noise floor" in printed


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path / "x.png"), "--steps", "0"]) == 2
    assert "expected --steps to be an integer >= 1, found 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown"):
        run_demo(tmp_path / "y.png", steps=5, num_samples=10, sampler="no_such_sampler", log=lambda *_: None)


@pytest.mark.slow
def test_full_demo_is_close_to_exact_samples(tmp_path):
    """The default demo (3000 training steps) lands near the noise floor of two exact sample sets."""
    r = run_demo(tmp_path / "demo.png", log=lambda *_: None)
    assert r.mode_weight_error < 3 * r.mode_weight_floor + 0.02
    assert r.sliced_w2 < 2.0 * r.sliced_w2_floor
