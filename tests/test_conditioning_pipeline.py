"""ScorePipeline with class labels (classifier-free guidance), operators / masks (inverse problems) and the
conditional samplers: the pipeline gives exactly what the score transforms give when run by hand."""

from __future__ import annotations

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from score_toolkit.analytic import ClassConditionalMixture
from score_toolkit.conditioning import ClassifierFreeGuidance, ClassifierGuidance, Mask, MatrixOperator, PiGDM
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


def test_tds_through_the_pipeline():
    """The pipeline hands the transform it builds (here PiGDM on the network's score) to ``tds``, which uses its
    twist: the same samples as the sampler called directly, and its diagnostics are computed."""
    pipe, proc = _pipe(), VPSDE()
    a = MatrixOperator(torch.tensor([[0.6, -0.8]], dtype=D64))
    y = torch.tensor([0.7], dtype=D64)
    out = pipe(5, operator=a, observation=y, noise_std=0.5, sampler="tds", num_steps=10, num_particles=3,
               generator=torch.Generator().manual_seed(1))
    fn = PiGDM(pipe.score_function(), proc, a, y, 0.5)
    ref = get_sampler("tds", num_steps=10, num_particles=3).sample(fn, proc, shape=(5, 2), dtype=D64,
                                                                  generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.samples, ref.samples)
    assert out.nfe == 10


def test_importance_ode_through_the_pipeline():
    """The pipeline's transform (PiGDM on a network's score) goes to ``importance_ode`` as well: its divergence needs the
    double backward through the network, and the samples are those of the sampler called directly."""
    pipe, proc = _pipe(), VPSDE()
    a = MatrixOperator(torch.tensor([[0.6, -0.8]], dtype=D64))
    y = torch.tensor([0.7], dtype=D64)
    opts = {"num_particles": 3, "method": "rk4", "num_steps": 4}
    out = pipe(4, operator=a, observation=y, noise_std=0.5, sampler="importance_ode", generator=torch.Generator().manual_seed(1),
               **opts)
    fn = PiGDM(pipe.score_function(), proc, a, y, 0.5)
    ref = get_sampler("importance_ode", **opts).sample(fn, proc, shape=(4, 2), dtype=D64,
                                                       generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.samples, ref.samples)
    assert out.nfe == ref.nfe == get_sampler("importance_ode", **opts).nfe
    assert ref.info["defensive_particles"] == 2 and 1 <= ref.info["final_ess"] <= 3


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


# ---------------------------------------------------------------------- class-conditional training (vector network)
@pytest.mark.slow
def test_label_dropout_training_gives_a_guidable_vector_network():
    """ScoreMLP with a label table trained by hand with the epsilon loss and 20 % label dropout on two separated
    classes: classifier-free-guided samples of each class are classified as that class by the exact classifier, and
    the null label gives both classes."""
    from score_toolkit.analytic import GaussianMixture
    from score_toolkit.conditioning import LabelledScoreAdapter, drop_labels
    from score_toolkit.models import ScoreMLP
    from score_toolkit.objectives import EpsilonLoss
    from score_toolkit.scores import ScoreAdapter

    torch.manual_seed(0)
    cc = ClassConditionalMixture(GaussianMixture([[-2.0, 0.0], [2.0, 0.5]], 0.25), [0, 1])
    proc = VPSDE()
    net = ScoreMLP(2, hidden_dim=64, num_layers=2, time_embedding="linear", num_classes=3).double()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    loss_fn = EpsilonLoss(proc)
    g = torch.Generator().manual_seed(1)
    for _ in range(800):
        x, comp = cc.mixture.sample(256, generator=g, return_labels=True)
        labels = drop_labels(cc.classes[comp], null_label=2, p=0.2, generator=g)
        score = ScoreAdapter(lambda y, t, lab=labels: net(y, t, class_labels=lab), proc, "epsilon", "t")
        loss = loss_fn(score, x, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapter = LabelledScoreAdapter(net, proc, "epsilon", "t")
    assert (adapter.num_classes, adapter.null_label) == (2, 2)
    sampler = get_sampler("ancestral", num_steps=100)
    for c in (0, 1):
        out = sampler.sample(ClassifierFreeGuidance(adapter, c, guidance_scale=1.0), proc, shape=(400, 2), dtype=D64,
                             generator=torch.Generator().manual_seed(c))
        frac = float((cc.class_log_prob(out.samples).argmax(1) == c).double().mean())
        assert frac > 0.95, (c, frac)
    out = sampler.sample(lambda x, t: adapter(x, t, torch.full((x.shape[0],), 2)), proc, shape=(400, 2), dtype=D64,
                         generator=torch.Generator().manual_seed(5))
    frac1 = float((cc.class_log_prob(out.samples).argmax(1) == 1).double().mean())
    assert 0.3 < frac1 < 0.7, frac1
    with pytest.raises(ValueError, match="without class labels"):
        ScoreMLP(2)(torch.zeros(1, 2), torch.ones(1), class_labels=torch.zeros(1))


def _train_config(out, data, num_classes, **train):
    return {
        "output_dir": str(out), "seed": 0, "data": data, "process": {"name": "VPSDE"},
        "model": {"name": "ScoreMLP", "prediction_type": "epsilon", "time_input": "t",
                  "options": {"hidden_dim": 16, "num_layers": 1, "time_embedding": "linear", "num_classes": num_classes}},
        "objective": {"name": "epsilon"},
        "train": {"steps": 4, "batch_size": 32, "checkpoint_every": 2, "log_every": 2, "progress": False, **train},
        "export": {"enabled": False},
    }


def test_training_loop_feeds_labels_with_dropout(tmp_path, monkeypatch):
    """score-toolkit train with a label-table network: the digits' labels reach the network, with the null label at
    the dropout rate; a set without labels, labels beyond the table and a bad dropout rate are errors."""
    from score_toolkit.models import ScoreMLP
    from score_toolkit.training import ConfigError, train

    seen = []
    forward = ScoreMLP.forward

    def spy(self, x, t, class_labels=None):
        if self.training and class_labels is not None:
            seen.append(class_labels.detach().clone())
        return forward(self, x, t, class_labels)

    monkeypatch.setattr(ScoreMLP, "forward", spy)
    train(_train_config(tmp_path / "a", {"name": "digits"}, 11, label_dropout=0.5))
    labels = torch.cat(seen)
    assert labels.numel() >= 4 * 32 and int(labels.max()) == 10 and int(labels.min()) >= 0
    null = float((labels == 10).double().mean())
    assert 0.3 < null < 0.7, null  # dropout 0.5
    with pytest.raises(ValueError, match="has no labels"):
        train(_train_config(tmp_path / "b", {"name": "ring", "options": {"num_samples": 200}}, 3))
    with pytest.raises(ValueError, match="do not fit the network's class-label table"):
        train(_train_config(tmp_path / "c", {"name": "digits"}, 5))
    with pytest.raises(ConfigError, match="label_dropout"):
        train(_train_config(tmp_path / "d", {"name": "digits"}, 11, label_dropout=1.5))


def test_a_label_conditional_unet_samples_unconditionally_with_the_null_label():
    from diffusers import DDPMScheduler, UNet2DModel

    from score_toolkit.scores import ScoreAdapter

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4,
                       num_class_embeds=4).eval()
    pipe = ScorePipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100))
    out = pipe(2, sampler="ancestral", num_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt")
    process, pred, ti = pipe.spec
    null = ScoreAdapter(lambda x, t: unet(x, t, class_labels=torch.full((x.shape[0],), 3)), process, pred, ti)
    ref = get_sampler("ancestral", num_steps=3).sample(null, process, shape=(2, 1, 8, 8),
                                                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.samples, ref.samples)
    guided = pipe(2, class_labels=0, sampler="ancestral", num_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="pt")
    assert not torch.equal(out.samples, guided.samples)


def test_class_conditional_unet_trains_exports_and_is_guidable(tmp_path):
    """score-toolkit train on digits with a UNet2DModel label table: the export (which samples the model
    unconditionally, with the null label) works, and the exported pipeline takes class_labels."""
    from score_toolkit.training import train

    cfg = {
        "output_dir": str(tmp_path / "run"), "seed": 0, "data": {"name": "digits"},
        "process": {"name": "DiscreteVP", "options": {"num_train_timesteps": 100}},
        "model": {"name": "UNet2DModel", "prediction_type": "epsilon", "time_input": "index",
                  "options": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
                              "down_block_types": ["DownBlock2D", "DownBlock2D"],
                              "up_block_types": ["UpBlock2D", "UpBlock2D"], "num_class_embeds": 11}},
        "objective": {"name": "epsilon"},
        "train": {"steps": 2, "batch_size": 16, "checkpoint_every": 2, "log_every": 1, "progress": False},
        "export": {"folder": str(tmp_path / "pipe"), "sampler": "ancestral", "sampler_options": {"num_steps": 3},
                   "num_samples": 4},
    }
    train(cfg)
    pipe = ScorePipeline.from_pretrained(str(tmp_path / "pipe"))
    out = pipe(3, class_labels=7, guidance_scale=2.0, sampler="dpmpp_2m", num_steps=3, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.samples.shape == (3, 1, 8, 8) and bool(torch.isfinite(out.samples).all())
    with pytest.raises(ValueError, match=r"\[10\] outside the model's classes 0..9"):
        pipe(1, class_labels=10, sampler="dpmpp_2m", num_steps=3)
