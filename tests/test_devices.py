"""Device- and dtype-agnostic code, run on the CPU: reduced-precision networks (bfloat16 runs for real on CPUs) and
devices without float64 (MPS), approximated by the rule that gives the times float32 there."""

from __future__ import annotations

import copy

import pytest
import torch

from score_toolkit.pipeline import ScorePipeline


def _label_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=3).eval()


@pytest.mark.parametrize("conditioning", [{}, {"class_labels": [0, 1, 0], "guidance_scale": 2.0},
                                          {"class_labels": 1, "network_batch_size": 2},
                                          {"mask": torch.ones(1, 8, 8).tril()}])
def test_bfloat16_label_conditional_network_samples_like_float32(conditioning):
    # a bfloat16 network trained with labels, sampled without them (its null label), with guidance, in fixed network
    # batches, or inpainting: float32 states, the network's inputs cast to bfloat16 (a float32 state reached a
    # bfloat16 network, or the class labels were refused)
    from diffusers import DDPMScheduler

    unet = _label_unet()
    full = ScorePipeline(unet, DDPMScheduler(num_train_timesteps=100, clip_sample=False))
    half = ScorePipeline(copy.deepcopy(unet).to(torch.bfloat16), DDPMScheduler(num_train_timesteps=100, clip_sample=False))
    kwargs = dict(sampler="dpmpp_2m", num_inference_steps=3, output_type="pt", **conditioning)
    if "mask" in conditioning:
        kwargs["observation"] = torch.zeros(3, 1, 8, 8)
    ref = full(3, generator=torch.Generator().manual_seed(0), **kwargs).samples
    out = half(3, generator=torch.Generator().manual_seed(0), **kwargs).samples
    assert out.dtype == torch.float32
    # bfloat16 has 8 bits of mantissa: close to the float32 run, not equal; as close as the float32 network with its
    # weights rounded to bfloat16 gets, within a small factor (the activations are rounded too)
    rounded_unet = copy.deepcopy(unet)
    with torch.no_grad():
        for p in rounded_unet.parameters():
            p.copy_(p.bfloat16().float())
    rounded = ScorePipeline(rounded_unet, DDPMScheduler(num_train_timesteps=100, clip_sample=False))
    floor = float((rounded(3, generator=torch.Generator().manual_seed(0), **kwargs).samples - ref).abs().max())
    assert not torch.equal(out, ref)
    assert 0 < floor and float((out - ref).abs().max()) < 4 * floor + 1e-3 * float(ref.abs().max()), floor


def _mps_time_rule(monkeypatch):
    """The rule of devices without float64 (MPS), on the CPU: the samplers' times on the state's device in float32."""
    import score_toolkit.samplers.adaptive as adaptive
    import score_toolkit.samplers.base as base
    import score_toolkit.samplers.pf_ode as pf_ode

    rule = lambda x: torch.float32  # noqa: E731
    for module in (base, adaptive, pf_ode):
        monkeypatch.setattr(module, "time_dtype", rule)


@pytest.mark.parametrize("name, options", [("adaptive_ode", {}), ("adaptive_sde", {}), ("pf_ode", {}),
                                           ("pf_ode", {"method": "rk4", "num_steps": 20})])
def test_samplers_keep_no_float64_time_on_a_device_without_it(monkeypatch, name, options):
    # the per-sample times and steps of the adaptive samplers, the Brownian memory of adaptive_sde and pf_ode's
    # torchdiffeq times were float64 tensors on the state's device whatever the device (MPS: an error); under the
    # MPS rule they are float32, and the samples stay accurate
    import torchdiffeq

    import score_toolkit.samplers.adaptive as adaptive
    import score_toolkit.samplers.base as base
    from score_toolkit.processes import VPSDE
    from score_toolkit.registry import get_sampler
    from score_toolkit.testing import check_accuracy, conformance_mixture

    _mps_time_rule(monkeypatch)
    seen = set()
    score = base.SamplingContext.score

    def recording_score(self, x, t):  # the times the sampler holds, before the context converts them
        seen.add(t.dtype if isinstance(t, torch.Tensor) else float)
        return score(self, x, t)

    odeint = torchdiffeq.odeint
    monkeypatch.setattr(base.SamplingContext, "score", recording_score)
    monkeypatch.setattr(torchdiffeq, "odeint", lambda f, y, t, **kw: (seen.add(t.dtype), odeint(f, y, t, **kw))[1])
    memory = adaptive._BrownianMemory.__init__

    def recording_memory(self, ctx, like):
        memory(self, ctx, like)
        seen.add(self.dt.dtype)

    monkeypatch.setattr(adaptive._BrownianMemory, "__init__", recording_memory)
    process = VPSDE()
    mixture = conformance_mixture()
    check_accuracy(get_sampler(name, **options), mixture.score_fn(process), process, mixture, num_samples=1000)
    assert seen and torch.float64 not in seen, seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_log_likelihood_refuses_half_precision_data(dtype):
    # bfloat16 data was integrated in bfloat16 (a log-density far less accurate than in float32),
    # float16 data failed with "expected t in [0, 1], found values in [nan, nan]"
    from score_toolkit.likelihood import log_likelihood
    from score_toolkit.processes import VPSDE
    from score_toolkit.testing import conformance_mixture

    process, mixture = VPSDE(), conformance_mixture(torch.float32)
    x = torch.tensor([[-2.0, -1.0], [2.0, 0.5]])
    with pytest.raises(TypeError, match=rf"expected x in float32 or float64, found {dtype}.*x.float\(\)"):
        log_likelihood(mixture.score_fn(process), process, x.to(dtype))


def test_log_likelihood_refuses_an_mps_device():
    from score_toolkit.likelihood.options import _check_device

    _check_device(torch.device("cpu"))
    with pytest.raises(ValueError, match="expected x on a CPU or CUDA device.*MPS has no float64.*found mps"):
        _check_device(torch.device("mps"))


@pytest.mark.parametrize("time_embedding", ["log", "linear"])
def test_checked_network_score_never_reads_the_device(time_embedding):
    # on an accelerator, the input checks of ScoreAdapter (the range of t) and of the MLPs (t finite, t > 0) read
    # their reductions back at every score evaluation (four waits for the device); the meta device, which holds no
    # values, fails on any such read
    from score_toolkit.models.mlp import ScoreMLP
    from score_toolkit.processes import VPSDE
    from score_toolkit.scores import ScoreAdapter

    net = ScoreMLP(dim=2, hidden_dim=8, num_layers=1, embedding_dim=4, time_embedding=time_embedding).eval()
    score = ScoreAdapter(net.to("meta"), VPSDE(), "epsilon", "t")
    with torch.no_grad():
        out = score(torch.empty(5, 2, device="meta"), torch.full((5,), 0.5, device="meta"))
    assert out.shape == (5, 2) and out.device.type == "meta"


@pytest.mark.parametrize("bad, message", [(float("nan"), "expected finite t"), (float("inf"), "expected finite t"),
                                          (-float("inf"), "expected finite t"), (0.0, r"expected t > 0 .* found min 0"),
                                          (-0.5, r"expected t > 0 .* found min -0.5")])
def test_mlp_time_checks(bad, message):
    from score_toolkit.models.mlp import ScoreMLP

    for embedding in ("log", "linear"):
        net = ScoreMLP(dim=2, hidden_dim=8, num_layers=1, embedding_dim=4, time_embedding=embedding)
        t = torch.tensor([0.5, bad, 0.25])
        if embedding == "linear" and "finite" not in message:
            assert net(torch.zeros(3, 2), t).shape == (3, 2)  # the linear embedding takes t <= 0
            continue
        with pytest.raises(ValueError, match=message):
            net(torch.zeros(3, 2), t)
    from score_toolkit.processes import VPSDE

    with pytest.raises(ValueError, match=r"expected t in \[0.001, 1\] for VPSDE, found values in \[nan, nan\]"):
        VPSDE().check_t(torch.tensor([0.5, float("nan")]))


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_bf16_training_returns_the_network_without_autocast(tmp_path, ema_decay):
    # after bf16 mixed-precision training, the model returned (and sampled by the export for its model card) still ran
    # its forward pass under Accelerate's bfloat16 autocast, unlike the float32 network the export loads as
    from helpers import small_run_config

    from score_toolkit.models import ScoreMLP
    from score_toolkit.training import train

    cfg = small_run_config(tmp_path / "run", num_samples=200, train_defaults={
        "steps": 2, "batch_size": 16, "mixed_precision": "bf16", "ema_decay": ema_decay})
    model = train(cfg).model
    plain = ScoreMLP(**{k: v for k, v in model.config.items() if not k.startswith("_")})
    plain.load_state_dict(model.state_dict())
    x, t = torch.randn(8, 2), torch.linspace(0.1, 1.0, 8)
    with torch.no_grad():
        assert torch.equal(model(x, t), plain.eval()(x, t))


@pytest.mark.parametrize("metric", ["sliced_wasserstein", "energy_distance", "mmd"])
def test_sample_metrics_of_half_precision_samples_are_computed_in_float32(metric):
    # bfloat16 samples were compared in bfloat16 (sums over thousands of pairs and sorted differences in 8 bits of
    # mantissa); now as their float32 values. The random projections still come from the generator's device.
    from score_toolkit import metrics

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 3, generator=g).to(torch.bfloat16)
    y = (torch.randn(500, 3, generator=g) * 1.1 + 0.1).to(torch.bfloat16)
    fn = getattr(metrics, metric)
    assert fn(x, y) == fn(x.float(), y.float())
    if metric == "sliced_wasserstein":  # the same projections as drawn on the CPU with torch.randn
        theta = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
        theta = theta / theta.norm(dim=0, keepdim=True)
        px, _ = torch.sort(x.float() @ theta, dim=0)
        py, _ = torch.sort(y.float() @ theta, dim=0)
        expected = float((metrics._quantiles(px, 600) - metrics._quantiles(py, 600)).pow(2).mean().sqrt())
        assert fn(x, y, num_projections=16, generator=torch.Generator().manual_seed(5)) == expected


@pytest.mark.parametrize("time_embedding", ["log", "linear"])
def test_a_half_precision_mlp_embeds_the_time_as_float32_does(time_embedding):
    # a bfloat16 ScoreMLP gets float32 times (as the pipeline passes them) and keeps float32 Fourier frequencies: its
    # time features equal the float32 network's, and its output differs by the rounding of its weights only (with
    # fourier_scale 16 the phases reach 300 rad, which bfloat16 rounds to 2 rad)
    from score_toolkit.models import ScoreMLP

    torch.manual_seed(0)
    net = ScoreMLP(2, hidden_dim=64, num_layers=2, fourier_scale=16.0, time_embedding=time_embedding).eval()
    half = copy.deepcopy(net).to(torch.bfloat16)
    assert half.time_embed.W.dtype == torch.float32 and torch.equal(half.time_embed.W, net.time_embed.W)
    assert half.output.weight.dtype == torch.bfloat16
    x, t = torch.randn(2048, 2), torch.rand(2048) * 0.99 + 0.01
    with torch.no_grad():
        assert torch.equal(half.time_embed(t), net.time_embed(t))
        ref, out = net(x, t), half(x.bfloat16(), t)
        # the same network with only its weights rounded to bfloat16, run in float32: the error bfloat16 must cost
        rounded = copy.deepcopy(net)
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
        floor = float((rounded(x, t) - ref).norm() / ref.norm())
    assert out.dtype == torch.bfloat16
    assert float((out.float() - ref).norm() / ref.norm()) < 3 * floor + 4e-3, floor


def test_a_half_precision_mlp_saves_and_loads_its_frequencies_in_float32(tmp_path):
    import warnings

    from safetensors import safe_open

    from score_toolkit.models import ScoreMLP

    torch.manual_seed(0)
    net = ScoreMLP(2, hidden_dim=16, num_layers=1, fourier_scale=16.0).eval()
    net.save_pretrained(tmp_path / "f32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the conversion asked for: no CheckpointDtypeWarning
        half = ScoreMLP.from_pretrained(tmp_path / "f32", torch_dtype=torch.bfloat16)
    assert half.output.weight.dtype == torch.bfloat16 and torch.equal(half.time_embed.W, net.time_embed.W)
    half.save_pretrained(tmp_path / "bf16")
    with safe_open(str(tmp_path / "bf16" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice("time_embed.W").get_dtype() == "F32" and f.get_slice("output.weight").get_dtype() == "BF16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = ScoreMLP.from_pretrained(tmp_path / "bf16", torch_dtype=torch.bfloat16)
    assert again.output.weight.dtype == torch.bfloat16 and torch.equal(again.time_embed.W, net.time_embed.W)


def test_label_dropout_draws_no_float64_on_a_device_without_it(monkeypatch):
    # training a label-conditional network on MPS drew float64 uniforms there (MPS has no float64)
    import score_toolkit._utils as utils
    from score_toolkit.conditioning.guidance import drop_labels

    labels = torch.arange(6) % 3
    drawn = []
    rand = utils.rand
    monkeypatch.setattr(utils, "rand", lambda *a, **k: drawn.append(k["dtype"]) or rand(*a, **k))
    assert torch.equal(drop_labels(labels, 3, 0.0), labels) and drawn == [torch.float64]  # the CPU: float64
    _mps_time_rule(monkeypatch)
    assert torch.equal(drop_labels(labels, 3, 1.0), torch.full_like(labels, 3)) and drawn[-1] == torch.float32
