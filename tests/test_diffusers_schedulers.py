"""score_toolkit's samplers as diffusers schedulers: the contract diffusers' own scheduler tests apply (config
round trip, from_config swapping, shapes, generator determinism), explicit step state, the same trajectories
as the samplers they mirror, exact Gaussian moments through diffusers' DDPMPipeline, and a swapped pipeline
that saves, reloads and gives identical output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import (
    ConfigMixin,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    ModelMixin,
    ScoreSdeVeScheduler,
    UNet2DModel,
)
from diffusers.configuration_utils import register_to_config

from score_toolkit import diffusers_schedulers as ds
from score_toolkit.analytic import gaussian
from score_toolkit.processes import VESDE, VPSDE, DiscreteVP, SubVPSDE
from score_toolkit.registry import get_sampler
from score_toolkit.samplers.dpm_solver import DPMSolverPP2M, DPMSolverPP3M
from score_toolkit.schedulers import ScoreSDEScheduler, read_scheduler_config, scheduler_for
from score_toolkit.scores import ScoreAdapter, score_to_prediction

CLASSES = [ds.ScoreAncestralScheduler, ds.ScoreEulerMaruyamaScheduler, ds.ScoreDPMSolverScheduler]
STOCHASTIC = {ds.ScoreAncestralScheduler: True, ds.ScoreEulerMaruyamaScheduler: True, ds.ScoreDPMSolverScheduler: False}


class AnalyticNet(ModelMixin, ConfigMixin):
    """A 'network' that outputs exactly what a perfect one would for Gaussian(-mixture) data: it receives the
    time input of ``time_input`` (and refuses anything but a float tensor, the UNet2DModel float trap)."""

    @register_to_config
    def __init__(self, sample_size=(1, 2), in_channels: int = 1):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def bind(self, mixture, process, prediction_type, time_input):
        self.mixture, self.process, self.prediction_type = mixture, process, prediction_type
        self.adapter = ScoreAdapter(lambda x, t: None, process, prediction_type, time_input, check_inputs=False)
        self.time_input = time_input
        return self

    def forward(self, x, time):
        assert isinstance(time, torch.Tensor) and time.is_floating_point(), f"time input {time!r}"
        time = time.expand(x.shape[0]) if time.ndim == 0 else time
        t = _invert_time(self.adapter, time.double())
        alpha, sigma = self.process.marginal(t)
        flat = x.reshape(x.shape[0], -1).double()
        s = self.mixture.score(flat, t, self.process)
        pred = score_to_prediction(s, flat, alpha, sigma, self.prediction_type)
        return type("Out", (), {"sample": pred.reshape(x.shape).to(x.dtype)})()


def _invert_time(adapter, values):
    if adapter.time_input == "t":
        return values
    if adapter.time_input == "index":
        a, b = adapter.network_time(torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist()
        return (values - a) / (b - a)
    assert isinstance(adapter.process, VESDE)  # sigma input: VE, where sigma is the noise-to-signal ratio
    return adapter.process.t_from_noise_to_signal(values)


def source_schedulers():
    """Schedulers whose configs ours must accept (read_scheduler_config says what they name)."""
    return [
        ("ddpm-eps-linear", DDPMScheduler(num_train_timesteps=100, beta_end=0.2)),
        ("ddim-v-cosine", DDIMScheduler(num_train_timesteps=100, prediction_type="v_prediction",
                                        beta_schedule="squaredcos_cap_v2")),
        ("ddpm-x0-scaled", DDPMScheduler(num_train_timesteps=100, beta_end=0.2, prediction_type="sample",
                                         beta_schedule="scaled_linear")),
        ("ve", ScoreSdeVeScheduler(num_train_timesteps=100, sigma_min=0.01, sigma_max=5.0)),
        # all defaults: diffusers' from_config would replace them by the target's defaults (_use_default_values)
        ("ve-defaults", ScoreSdeVeScheduler()),
        ("ddpm-defaults", DDPMScheduler()),
        ("vp-ours", scheduler_for(VPSDE(), "epsilon", "t")),
        ("subvp-score-sigma", scheduler_for(SubVPSDE(), "score", "sigma")),
    ]


def public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


# ------------------------------------------------------------------------------------ config contract
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("label, source", source_schedulers())
def test_from_config_reads_the_source_and_round_trips(tmp_path, cls, label, source):
    expected = read_scheduler_config(source)
    sched = cls.from_config(source.config)
    assert (sched.process, sched.prediction_type, sched.time_input) == expected
    assert sched.init_noise_sigma == pytest.approx(expected[0].prior_std)
    sched.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == cls.__name__
    again = cls.from_pretrained(tmp_path)
    assert public(again.config) == public(sched.config)
    assert (again.process, again.prediction_type, again.time_input) == expected
    # swapping between our classes keeps the model's description
    for other in CLASSES:
        swapped = other.from_config(sched.config)
        assert (swapped.process, swapped.prediction_type, swapped.time_input) == expected


def test_swapping_back_to_diffusers_keeps_the_beta_table_and_its_own_settings():
    src = DDPMScheduler(num_train_timesteps=100, beta_end=0.2, beta_schedule="scaled_linear", prediction_type="v_prediction",
                        clip_sample=False, timestep_spacing="trailing")
    ours = ds.ScoreDPMSolverScheduler.from_config(src.config)
    assert ours.config.clip_sample is False  # set aside (not ours), kept for the way back
    back = DDPMScheduler.from_config(ours.config)
    assert torch.equal(back.alphas_cumprod, src.alphas_cumprod)
    assert (back.config.prediction_type, back.config.clip_sample, back.config.timestep_spacing) == (
        "v_prediction", False, "trailing")


@pytest.mark.parametrize(
    "config, field",
    [
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"prediction_type": "flow"}, "prediction_type"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"time_input": "t"}, "time_input"),
        ({"grid": "linspace"}, "grid"),
        ({"sigma_max": 10.0, "prediction_type": "epsilon"}, "prediction_type"),
    ],
)
def test_configs_we_cannot_map_are_errors_naming_the_field(config, field):
    with pytest.raises(ValueError, match=field):
        ds.ScoreAncestralScheduler(**config)


def test_a_continuous_timestep_type_is_refused():
    from diffusers import EulerDiscreteScheduler

    with pytest.raises(ValueError, match="timestep_type"):
        ds.ScoreAncestralScheduler.from_config(EulerDiscreteScheduler(timestep_type="continuous").config)
    sched = ds.ScoreAncestralScheduler.from_config(EulerDiscreteScheduler(prediction_type="v_prediction").config)
    assert (sched.prediction_type, sched.time_input) == ("v_prediction", "index")


def test_energy_prediction_is_refused_with_a_pointer_to_the_pipeline():
    with pytest.raises(ValueError, match="ScorePipeline"):
        ds.ScoreEulerMaruyamaScheduler.from_config(scheduler_for(VPSDE(), "energy", "t").config)


# ------------------------------------------------------------------------------------ step contract
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("shape", [(3, 2), (2, 1, 4, 4)])
def test_timesteps_shapes_and_generator_determinism(cls, shape):
    sched = cls.from_config(DDPMScheduler(num_train_timesteps=100, beta_end=0.2).config)
    sched.set_timesteps(5)
    assert sched.timesteps.shape == (5,) and sched.timesteps.dtype == torch.float32
    assert bool((sched.timesteps[1:] < sched.timesteps[:-1]).all())
    assert sched.time_grid[0] == 1.0 and sched.time_grid[-1] == pytest.approx(sched.process.t_min)
    assert float(sched.timesteps[0]) == pytest.approx(99.0)  # the network input (table index) at t = 1
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sched.scale_model_input(x, sched.timesteps[0]), x)

    def run(seed, **kw):
        sched.set_timesteps(5)  # a new loop: the step counter starts again
        return sched.step(out, sched.timesteps[0], x, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = run(0), run(0), run(1)
    assert a.prev_sample.shape == shape and a.pred_original_sample.shape == shape
    assert torch.equal(a.prev_sample, b.prev_sample)
    assert torch.equal(a.prev_sample, c.prev_sample) != STOCHASTIC[cls]
    (tup,) = run(0, return_dict=False)
    assert torch.equal(tup, a.prev_sample)
    # a list of generators gives each sample its own noise: sample 0 does not depend on the others
    sched.set_timesteps(5)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(shape[0])]
    full = sched.step(out, sched.timesteps[0], x, generator=gens).prev_sample
    sched.set_timesteps(5)
    alone = sched.step(out[:1], sched.timesteps[0], x[:1], generator=[torch.Generator().manual_seed(10)]).prev_sample
    assert torch.equal(full[:1], alone)


def test_step_errors():
    sched = ds.ScoreAncestralScheduler()
    x = torch.zeros(2, 2)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(x, 999, x)
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        sched.step(x, 500.0, x)
    with pytest.raises(ValueError, match="shape"):
        sched.step(torch.zeros(2, 4), sched.timesteps[0], x)
    with pytest.raises(ValueError, match="one timestep for the whole batch"):
        sched.step(x, sched.timesteps[:2], x)
    with pytest.raises(ValueError, match="positive int"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="exactly one of"):
        sched.set_timesteps(4, timesteps=[999, 500])
    # the step is found from the timestep value, in any of its usual forms
    assert sched.index_for_timestep(sched.timesteps[2]) == 2
    assert sched.index_for_timestep(float(sched.timesteps[2])) == 2
    assert sched.index_for_timestep(sched.timesteps[2].double().expand(3)) == 2
    # after the first step, the counter decides; a timestep that is not the next one is an error, not a guess
    sched.step(x, sched.timesteps[0], x)
    assert sched.step_index == 1
    with pytest.raises(ValueError, match=r"expected timestep .*timesteps\[1\]"):
        sched.step(x, sched.timesteps[0], x)
    for t in sched.timesteps[1:]:
        sched.step(x, t, x)
    with pytest.raises(ValueError, match="all 4 steps"):
        sched.step(x, sched.timesteps[-1], x)


@pytest.mark.parametrize("cls", CLASSES)
def test_a_step_depends_only_on_its_inputs_and_its_index(cls):
    """Single-step updates and the first step of a multistep loop: starting at index 3 (set_begin_index, as
    img2img pipelines do) gives the same result whatever was run before."""
    sched = cls.from_config(DDPMScheduler(num_train_timesteps=100).config)
    x, out = torch.randn(3, 2), torch.randn(3, 2)

    def start_at_3(history_steps):
        sched.set_timesteps(6)
        for t in sched.timesteps[:history_steps]:
            sched.step(out, t, x, generator=torch.Generator().manual_seed(1))
        if history_steps == 0:
            sched.set_begin_index(3)
            assert sched.begin_index == 3
        else:
            sched.set_timesteps(6)
            sched.set_begin_index(3)
        return sched.step(out, sched.timesteps[3], x, generator=torch.Generator().manual_seed(0)).prev_sample

    assert torch.equal(start_at_3(0), start_at_3(2))


def test_multistep_history_is_the_previous_denoised_values():
    """diffusers' semantics: the solver keeps model outputs (denoised values), not samples, so a step on a sample
    that the previous step did not return works (inpainting re-noises part of it), and a loop that starts
    mid-schedule begins with a first-order step."""
    cfg = DDPMScheduler(num_train_timesteps=100).config
    sched = ds.ScoreDPMSolverScheduler.from_config(cfg)
    first = ds.ScoreDPMSolverScheduler.from_config(cfg, solver_order=1)
    sched.set_timesteps(6)
    ts = sched.timesteps
    x0, out = torch.randn(2, 2), torch.randn(2, 2)
    s0 = sched.step(out, ts[0], x0)
    assert [torch.equal(m, s0.pred_original_sample) for m in sched.model_outputs] == [True]
    x1 = s0.prev_sample + 0.1  # not the returned sample
    s1 = sched.step(out, ts[1], x1)
    assert len(sched.model_outputs) == 2 and torch.equal(sched.model_outputs[1], s0.pred_original_sample)
    # the order-2 step is the first-order step plus the correction from the previous denoised value
    first.set_timesteps(6)
    first.set_begin_index(1)
    d1 = first.step(out, ts[1], x1)
    assert torch.equal(d1.pred_original_sample, s1.pred_original_sample)
    assert not torch.allclose(d1.prev_sample, s1.prev_sample)
    # a loop starting at index 3 (img2img): first order there, whatever the solver order
    for start in (3, 4):
        sched.set_timesteps(6)
        sched.set_begin_index(start)
        first.set_timesteps(6)
        first.set_begin_index(start)
        assert torch.equal(sched.step(out, ts[start], x0).prev_sample, first.step(out, ts[start], x0).prev_sample)


def test_add_noise_is_the_forward_marginal():
    cfg = DDPMScheduler(num_train_timesteps=100, beta_end=0.2, beta_schedule="squaredcos_cap_v2").config
    ours, theirs = ds.ScoreAncestralScheduler.from_config(cfg), DDPMScheduler.from_config(cfg)
    x0 = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    noise = torch.randn_like(x0)
    idx = torch.tensor([0, 10, 50, 99])
    assert torch.allclose(ours.add_noise(x0, noise, idx), theirs.add_noise(x0, noise, idx), rtol=0, atol=1e-6)
    ve = ds.ScoreAncestralScheduler.from_config(ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=5.0).config)
    sigmas = torch.tensor([0.05, 0.5, 2.0, 5.0])
    assert torch.allclose(ve.add_noise(x0, noise, sigmas), x0 + sigmas.view(4, 1, 1, 1) * noise, atol=1e-9)
    with pytest.raises(ValueError, match="sigma"):
        ve.add_noise(x0, noise, torch.full((4,), 50.0))  # sigma above sigma_max: no such time


# ------------------------------------------------------------------------------------ same math as the samplers
@pytest.mark.parametrize(
    "cls, sampler, config",
    [
        (ds.ScoreAncestralScheduler, get_sampler("ancestral", num_steps=7), {}),
        (ds.ScoreAncestralScheduler, get_sampler("ancestral", num_steps=7, variance="forward", grid="log_sigma"),
         {"variance": "forward", "grid": "log_sigma"}),
        (ds.ScoreEulerMaruyamaScheduler, get_sampler("euler_maruyama", num_steps=7), {}),
        (ds.ScoreDPMSolverScheduler, DPMSolverPP2M(num_steps=7, grid="log_sigma", to_zero=False), {}),
        (ds.ScoreDPMSolverScheduler, DPMSolverPP3M(num_steps=7, grid="log_sigma", to_zero=False),
         {"solver_order": 3, "lower_order_final": False}),
        (ds.ScoreDPMSolverScheduler, DPMSolverPP3M(num_steps=7, grid="log_sigma", to_zero=False, lower_order_final=True),
         {"solver_order": 3}),
    ],
)
@pytest.mark.parametrize("label, source", [("ddpm-v", DDPMScheduler(num_train_timesteps=100, beta_end=0.2,
                                                                     prediction_type="v_prediction").config),
                                           ("ve", ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=5.0).config)])
def test_scheduler_loop_reproduces_the_sampler_bit_for_bit(cls, sampler, config, label, source):
    sched = cls.from_config(source, **config)
    mixture = gaussian([0.3, -0.2], [0.04, 0.09], dtype=torch.float64)
    net = AnalyticNet(sample_size=(1, 2)).bind(mixture, sched.process, sched.prediction_type, sched.time_input)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    score_fn = ScoreAdapter(net, sched.process, sched.prediction_type, sched.time_input)
    ref = sampler.sample(score_fn, sched.process, shape=(4, 1, 1, 2), generator=gens()).samples
    g = gens()
    x = sched.init_noise_sigma * torch.stack([torch.randn(1, 1, 2, generator=gi) for gi in g])
    sched.set_timesteps(7)
    for t in sched.timesteps:
        x = sched.step(net(x, t).sample, t, x, generator=g).prev_sample
    assert torch.equal(x, ref)


# ------------------------------------------------------------------------------------ in diffusers' own loop
@pytest.mark.parametrize("cls, steps", [(ds.ScoreAncestralScheduler, 1000), (ds.ScoreEulerMaruyamaScheduler, 1000),
                                        (ds.ScoreDPMSolverScheduler, 25)])
def test_ddpm_pipeline_with_our_scheduler_samples_the_exact_gaussian(cls, steps):
    """diffusers' DDPMPipeline loop, unchanged, with our scheduler and a perfect epsilon network for
    N(mean, diag(var)) data on the DDPM linear table: the sample moments match the data's."""
    mean, var = torch.tensor([0.2, -0.1], dtype=torch.float64), torch.tensor([0.02, 0.05], dtype=torch.float64)
    src = DDPMScheduler(num_train_timesteps=1000)  # diffusers' default table, clip_sample=True (ignored by ours)
    sched = cls.from_config(src.config)
    net = AnalyticNet(sample_size=(1, 2)).bind(gaussian(mean, var), sched.process, "epsilon", "index")
    pipe = DDPMPipeline(unet=net, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    n = 4000
    img = pipe(batch_size=n, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np").images
    x = torch.from_numpy(img).double().reshape(n, 2) * 2 - 1  # DDPMPipeline returns (x / 2 + 0.5) clamped to [0, 1]
    se_mean = (var / n).sqrt()
    assert ((x.mean(0) - mean).abs() < 4 * se_mean + 2e-3).all(), (x.mean(0), mean)
    assert ((x.var(0) / var - 1).abs() < 4 * (2 / n) ** 0.5 + 0.02).all(), (x.var(0), var)


# ------------------------------------------------------------------------------------ save, reload, same output
def _swapped_pipeline(tmp_path):
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100, beta_end=0.2))
    pipe.scheduler = ds.ScoreDPMSolverScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    return pipe


def test_swapped_diffusers_pipeline_saves_reloads_and_gives_identical_output(tmp_path):
    pipe = _swapped_pipeline(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["score_toolkit.diffusers_schedulers", "ScoreDPMSolverScheduler"]
    reloaded = DiffusionPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded) is DDPMPipeline and type(reloaded.scheduler) is ds.ScoreDPMSolverScheduler
    assert public(reloaded.scheduler.config) == public(pipe.scheduler.config)
    a = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images
    b = reloaded(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert (a == b).all()


@pytest.mark.slow
def test_swapped_pipeline_loads_in_a_fresh_process_after_import_score_toolkit(tmp_path):
    """What a user does: ``import score_toolkit`` then ``DiffusionPipeline.from_pretrained``."""
    _swapped_pipeline(tmp_path)
    code = (
        "import sys, score_toolkit\n"
        "from diffusers import DiffusionPipeline\n"
        f"p = DiffusionPipeline.from_pretrained({str(tmp_path)!r})\n"
        "print(type(p).__name__, type(p.scheduler).__name__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-2:] == ["DDPMPipeline", "ScoreDPMSolverScheduler"]


def test_sde_ve_config_in_our_process_form_is_equivalent():
    """A VE config read as ScoreSdeVeScheduler and the same VE process in a ScoreSDEScheduler give the same
    scheduler grid and steps."""
    a = ds.ScoreAncestralScheduler.from_config(ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=5.0, sampling_eps=1e-5).config)
    process = {"_class_name": "VESDE", "sigma_min": 0.01, "sigma_max": 5.0, "t_min": 1e-5, "num_train_timesteps": 2000}
    b = ds.ScoreAncestralScheduler.from_config(
        ScoreSDEScheduler(process=process, prediction_type="score", time_input="sigma").config)
    assert a.process == b.process
    a.set_timesteps(5)
    b.set_timesteps(5)
    assert torch.equal(a.timesteps, b.timesteps)


def test_discrete_vp_timesteps_are_table_indices():
    sched = ds.ScoreAncestralScheduler.from_config(DDPMScheduler(num_train_timesteps=1000).config)
    sched.set_timesteps(999)  # uniform grid from t = 1 to t_min = 1/N: exactly the table entries
    assert isinstance(sched.process, DiscreteVP)
    assert torch.allclose(sched.timesteps, torch.arange(999, 0, -1, dtype=torch.float32), atol=1e-3)
