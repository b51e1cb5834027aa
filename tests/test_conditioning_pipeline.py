"""ScorePipeline with class labels (classifier-free guidance), operators / masks (inverse problems) and the
conditional samplers: the pipeline gives exactly what the score transforms give when run by hand."""

from __future__ import annotations

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from score_toolkit.analytic import ClassConditionalMixture
from score_toolkit.conditioning import ClassifierGuidance, Mask, MatrixOperator, PiGDM
from score_toolkit.pipeline import ScorePipeline
from score_toolkit.processes import VPSDE
from score_toolkit.registry import get_sampler
from score_toolkit.schedulers import scheduler_for
from score_toolkit.scores import score_to_prediction
from score_toolkit.testing import conformance_mixture

D64 = torch.float64


def _classes():
    return ClassConditionalMixture(conformance_mixture(), [0, 1, 1])


class ExactLabelledNet(ModelMixin, ConfigMixin):
    """A perfect label-conditional epsilon network of the class-conditional test mixture (time input t); its
    label table has ``num_classes`` rows, the last being the null label. Without labels it is unconditional."""

    @register_to_config
    def __init__(self, dim: int = 2, num_classes: int | None = 3):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))
        self.cc, self.process = _classes(), VPSDE()
        self.fn = self.cc.score_fn(self.process)

    def forward(self, x, time, class_labels=None):
        if class_labels is None:
            class_labels = torch.full((x.shape[0],), self.cc.null_label)
        s = self.fn(x.double(), time.double(), class_labels)
        alpha, sigma = self.process.marginal(time.double())
        return score_to_prediction(s, x.double(), alpha, sigma, "epsilon").to(x.dtype)


def _pipe(num_classes=3):
    return ScorePipeline(unet=ExactLabelledNet(2, num_classes).to(D64), scheduler=scheduler_for(VPSDE(), "epsilon", "t"))


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_class_labels_with_guidance(scale):
    pipe, cc, proc = _pipe(), _classes(), VPSDE()
    out = pipe(6, class_labels=1, guidance_scale=scale, sampler="pf_ode", generator=torch.Generator().manual_seed(0))
    guided = ClassifierGuidance(cc.mixture.score_fn(proc), cc.classifier(proc), 1, scale=scale)
    ref = get_sampler("pf_ode").sample(guided, proc, shape=(6, 2), dtype=D64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.samples, ref.samples, atol=1e-4, rtol=1e-4)


def test_inverse_problem_through_the_pipeline():
    pipe, proc = _pipe(), VPSDE()
    a = MatrixOperator(torch.tensor([[0.6, -0.8]], dtype=D64))
    y = torch.tensor([0.7], dtype=D64)
    out = pipe(5, operator=a, observation=y, noise_std=0.5, sampler="ancestral", num_steps=20,
               generator=torch.Generator().manual_seed(1))
    fn = PiGDM(pipe.score_function(), proc, a, y, 0.5)
    ref = get_sampler("ancestral", num_steps=20).sample(fn, proc, shape=(5, 2), dtype=D64,
                                                      generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.samples, ref.samples)


def test_mask_goes_to_repaint_as_its_options():
    pipe, proc = _pipe(), VPSDE()
    m, y = torch.tensor([1, 0]), torch.tensor([1.0, 0.0], dtype=D64)
    out = pipe(4, mask=m, observation=y, sampler="repaint", num_steps=20, jump_length=5, jump_n_sample=2,
               generator=torch.Generator().manual_seed(2))
    ref = get_sampler("repaint", num_steps=20, jump_length=5, jump_n_sample=2, operator=Mask(m), observation=y).sample(
        pipe.score_function(), proc, shape=(4, 2), dtype=D64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out.samples, ref.samples)
    assert float((out.samples[:, 0] - 1.0).abs().max()) < 0.2  # the observed coordinate is kept (up to sigma(t_min))


def test_pipeline_conditioning_errors():
    pipe = _pipe()
    with pytest.raises(ValueError, match="guidance_scale needs class_labels"):
        pipe(2, guidance_scale=2.0, sampler="pf_ode")
    with pytest.raises(ValueError, match=r"class label\(s\) \[2\] outside the model's classes 0..1"):
        pipe(2, class_labels=2, sampler="pf_ode")
    with pytest.raises(ValueError, match="built without class labels"):
        _pipe(num_classes=None)(2, class_labels=0, sampler="pf_ode")
    with pytest.raises(ValueError, match=r"observation of shape \(2,\) or \(2, 2\).*found \(3,\)"):
        pipe(2, mask=torch.tensor([1, 0]), observation=torch.zeros(3, dtype=D64), sampler="pf_ode")
    with pytest.raises(ValueError, match="pass an observation together with operator or mask"):
        pipe(2, mask=torch.tensor([1, 0]), sampler="pf_ode")
    with pytest.raises(ValueError, match=r"mask: expected a mask of the per-sample shape \(2,\)"):
        pipe(2, mask=torch.tensor([1, 0, 1]), observation=torch.zeros(2, dtype=D64), sampler="ancestral", num_steps=3)


# ---------------------------------------------------------------------- command line
def test_class_labels_with_network_batch_size_match_whole_batches():
    pipe = _pipe()
    a = pipe(5, class_labels=[0, 1, 1, 0, 1], guidance_scale=2.0, sampler="ancestral", num_steps=5,
             generator=[torch.Generator().manual_seed(i) for i in range(5)])
    b = pipe(5, class_labels=[0, 1, 1, 0, 1], guidance_scale=2.0, sampler="ancestral", num_steps=5,
             generator=[torch.Generator().manual_seed(i) for i in range(5)], network_batch_size=3)
    torch.testing.assert_close(a.samples, b.samples)


def _digit_png(path):
    import numpy as np
    from PIL import Image

    from score_toolkit.data import load_digits

    x = load_digits().data[1500, 0].numpy()
    Image.fromarray(((x + 1) / 2 * 255).round().astype(np.uint8)).save(path)
    return x


def test_restore_command_on_the_shipped_digits_model(tmp_path, capsys):
    from safetensors.torch import load_file

    from score_toolkit.cli import main

    truth = torch.from_numpy(_digit_png(tmp_path / "digit.png"))
    out = tmp_path / "inpaint"
    assert main(["restore", str(tmp_path / "digit.png"), "--task", "inpaint", "--mask-kind", "left_half", "--degrade",
                 "--method", "replacement", "--steps", "20", "--num-samples", "2", "--output-dir", str(out)]) == 0
    res = load_file(out / "restored.safetensors")
    assert res["samples"].shape == (2, 1, 8, 8) and (out / "restored.png").exists() and (out / "manifest.json").exists()
    # observed pixels (left half) are kept up to the noise at t_min
    assert float((res["samples"][:, 0, :, :4] - truth[:, :4]).abs().max()) < 0.15
    out = tmp_path / "sr"
    assert main(["restore", str(tmp_path / "digit.png"), "--task", "super_resolution", "--degrade", "--steps", "10",
                 "--num-samples", "1", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["restore", str(tmp_path / "digit.png"), "--task", "super_resolution", "--steps", "5",
                 "--output-dir", str(tmp_path / "x")]) == 2
    assert "expected an observation image of shape (1, 4, 4)" in capsys.readouterr().err
    assert main(["restore", str(tmp_path / "digit.png"), "--task", "colorize", "--output-dir", str(tmp_path / "y")]) == 2
    assert "3-channel model" in capsys.readouterr().err
    assert main(["restore", str(tmp_path / "digit.png"), "--task", "inpaint", "--output-dir", str(tmp_path / "z")]) == 2
    assert "exactly one of --mask FILE or --mask-kind" in capsys.readouterr().err


def test_sample_command_refuses_class_labels_on_an_unlabelled_network(tmp_path, capsys):
    from score_toolkit.cli import main

    code = main(["sample", "--num-samples", "2", "--class-label", "3", "--guidance-scale", "2",
                 "--output-dir", str(tmp_path / "s"), "--no-progress"])
    assert code == 2
    assert "built without class labels" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
