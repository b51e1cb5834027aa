"""Bad input at the Python API's public boundaries is a clear error saying what was expected and what was found
(or is converted when its meaning is unambiguous), instead of a raw error from deep inside or a silent result."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import UNet2DModel

from score_toolkit.models import ScoreMLP, load_model
from score_toolkit.pipeline import ScorePipeline
from score_toolkit.processes import VPSDE
from score_toolkit.schedulers import scheduler_for


def vector_pipeline():
    torch.manual_seed(0)
    return ScorePipeline(unet=ScoreMLP(2, hidden_dim=16, num_layers=1).eval(),
                         scheduler=scheduler_for(VPSDE(), "epsilon", "t"))


# ------------------------------------------------------------------------------------ torch_dtype by name
@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("p") / "p"
    vector_pipeline().save_pretrained(folder)
    return folder


@pytest.mark.filterwarnings("ignore::score_toolkit.models.CheckpointDtypeWarning")
@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("torch.float16", torch.float16),
                                         ("float64", torch.float64), ("half", torch.float16),
                                         (torch.bfloat16, torch.bfloat16)])
def test_torch_dtype_names_are_converted(saved_folder, name, dtype):
    pipe = ScorePipeline.from_pretrained(saved_folder, torch_dtype=name)
    assert next(pipe.unet.parameters()).dtype == dtype
    assert next(load_model(None, saved_folder, subfolder="unet", torch_dtype=name).parameters()).dtype == dtype


@pytest.mark.parametrize("bad", ["bogus", "int32", torch.int64, "complex64", 16, "manual_seed"])
def test_other_torch_dtypes_are_refused(saved_folder, bad):
    with pytest.raises(TypeError, match=r"torch_dtype: expected a floating-point torch.dtype .*found"):
        ScorePipeline.from_pretrained(saved_folder, torch_dtype=bad)
    with pytest.raises(TypeError, match=r"torch_dtype: expected a floating-point torch.dtype .*found"):
        load_model(None, saved_folder, subfolder="unet", torch_dtype=bad)


# ------------------------------------------------------------------------------------ Sampler.sample
@pytest.fixture(scope="module")
def gaussian_case():
    from score_toolkit.registry import get_sampler

    process = VPSDE()
    return get_sampler("euler_maruyama", num_steps=2, progress=False), (lambda x, t: -x), process


def test_sampler_refuses_non_floating_dtypes(gaussian_case):
    sampler, score_fn, process = gaussian_case
    for bad in (torch.int32, "int64", "bogus"):
        with pytest.raises(TypeError, match=r"euler_maruyama: dtype: expected a floating-point torch.dtype "
                                            r"or its name .*found"):
            sampler.sample(score_fn, process, shape=(4, 2), dtype=bad)
    assert sampler.sample(score_fn, process, shape=(4, 2), dtype="float64").samples.dtype == torch.float64


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_sampler_refuses_a_missing_device(gaussian_case):
    sampler, score_fn, process = gaussian_case
    for bad in ("cuda", "cuda:1", "no_such_device"):
        with pytest.raises(ValueError, match=rf"device: expected a device available on this machine .*found '{bad}'"):
            sampler.sample(score_fn, process, shape=(4, 2), device=bad)
    assert sampler.sample(score_fn, process, shape=(4, 2), device="cpu").samples.device.type == "cpu"


def test_sampler_dtype_and_device_must_agree_with_x_init(gaussian_case):
    sampler, score_fn, process = gaussian_case
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"dtype torch.float64 / device None disagree with x_init.s torch.float32 / cpu"):
        sampler.sample(score_fn, process, x, dtype=torch.float64)
    assert sampler.sample(score_fn, process, x, dtype=torch.float32, device="cpu").samples.shape == (4, 2)


@pytest.mark.parametrize("bad, found", [(float("nan"), "1 of 4 samples (first: sample 2)"),
                                        (float("-inf"), "1 of 4 samples (first: sample 2)")])
def test_sampler_refuses_a_non_finite_x_init(gaussian_case, bad, found):
    """A NaN / inf start was reported only after the first step, as a state 'became' non-finite (blaming the step
    size or the score function)."""
    sampler, score_fn, process = gaussian_case
    x = torch.zeros(4, 2)
    x[2, 1] = bad
    with pytest.raises(ValueError, match=rf"euler_maruyama.: expected finite x_init, found NaN or infinite values in "
                                         rf"{re.escape(found)}"):
        sampler.sample(score_fn, process, x)


@pytest.mark.parametrize("name", ["euler_maruyama", "adaptive_ode"])
def test_sampler_refuses_states_without_a_data_dimension(name):
    """A (B,) state ran as B scalars in most samplers and was an IndexError in the adaptive ones."""
    from score_toolkit.registry import get_sampler

    sampler, process = get_sampler(name, progress=False), VPSDE()
    with pytest.raises(ValueError, match=r"expected x_init with at least one sample .* of shape \(B, d, \.\.\.\) .*found shape \(3,\)"):
        sampler.sample(lambda x, t: -x, process, torch.zeros(3))
    for bad in [(3,), 3, (3, 2.0), (3, True)]:
        with pytest.raises(ValueError, match=r"expected shape to be positive ints \(B, d, \.\.\.\)"):
            sampler.sample(lambda x, t: -x, process, shape=bad)


def test_sampler_checks_callback_and_return_trajectory_before_sampling(gaussian_case):
    """A non-callable callback failed after the first step's work; a truthy string return_trajectory was taken as
    True."""
    sampler, _, process = gaussian_case
    calls = []

    def score_fn(x, t):
        calls.append(1)
        return -x

    for kw in (dict(callback=3), dict(return_trajectory="no"), dict(return_trajectory=1)):
        with pytest.raises(TypeError, match=r"expected a callable \(or None\) callback and a bool return_trajectory"):
            sampler.sample(score_fn, process, shape=(2, 2), **kw)
    assert calls == []
    assert sampler.sample(score_fn, process, shape=(2, 2), callback=lambda info: None,
                          return_trajectory=True).trajectory is not None


# ------------------------------------------------------------------------------------ ScorePipeline shape
def test_pipeline_checks_the_shape_against_the_network():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    from diffusers import DDPMScheduler

    images = ScorePipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100, beta_end=0.2))
    run = dict(sampler="ancestral", num_steps=1, output_type="pt")
    for bad in [(2, 3, 8, 8), (2, 8, 8), (1, 1, 8, 8, 1)]:
        with pytest.raises(ValueError, match=r"expected shape=\(batch, 1, H, W\) for this UNet2DModel \(one sample is "
                                             r"\(1, 8, 8\); shape includes the batch dimension\), found shape="):
            images(shape=bad, **run)
    assert images(batch_size=2, shape=(2, 1, 16, 16), **run).samples.shape == (2, 1, 16, 16)  # another image size
    vectors = vector_pipeline()
    with pytest.raises(ValueError, match=r"expected shape=\(batch, 2\) for this ScoreMLP .*found shape=\(3, 4\)"):
        vectors(shape=(3, 4), **run)
    with pytest.raises(ValueError, match=r"found shape=\(3, 2, 1\)"):
        vectors(shape=(3, 2, 1), **run)


def test_pipeline_checks_value_range_before_sampling():
    """A bad value_range for images was an error only after the whole sampling run."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    from diffusers import DDPMScheduler

    calls = []
    unet.register_forward_hook(lambda *args: calls.append(1))
    images = ScorePipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100, beta_end=0.2))
    images.set_progress_bar_config(disable=True)
    for bad in [(1.0, -1.0), (0.0, float("inf")), ("a", 1), (1.0,)]:
        with pytest.raises(ValueError, match=r"expected value_range \(low, high\): two finite numbers with high > low"):
            images(batch_size=1, sampler="ancestral", num_steps=2, output_type="pt", value_range=bad)
    assert calls == []
    out = images(batch_size=1, sampler="ancestral", num_steps=2, output_type="pt", value_range=(0, 1))
    assert calls and out.images.shape == (1, 1, 8, 8)


# ------------------------------------------------------------------------------------ metrics and mixtures
def test_mixture_and_noise_floor_sizes():
    from score_toolkit.analytic import GaussianMixture, ring_mixture
    from score_toolkit.metrics import noise_floor

    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf"ring_mixture: expected num_modes to be a positive int, found {bad!r}"):
            ring_mixture(num_modes=bad)
    with pytest.raises(ValueError, match="expected a finite radius and a finite std > 0"):
        ring_mixture(std=0.0)
    with pytest.raises(ValueError, match=r"K >= 1 components in d >= 1 dims, found \(0, 2\)"):
        GaussianMixture(torch.zeros(0, 2))
    with pytest.raises(ValueError, match="expected finite means"):
        GaussianMixture(torch.tensor([[0.0, float("nan")]]))
    ring = ring_mixture()
    for bad in (0, -3, 1.5):
        with pytest.raises(ValueError, match=rf"noise_floor: expected n to be a positive int .*found {bad!r}"):
            noise_floor(ring, bad)
    with pytest.raises(ValueError, match=r"expected n to be an int >= 0 \(number of samples\), found -1"):
        ring.sample(-1)
    assert ring.sample(torch.tensor(3)).shape == (3, 2) and noise_floor(ring, 1) >= 0


def test_metrics_refuse_empty_and_non_finite_samples():
    from score_toolkit.analytic import ring_mixture
    from score_toolkit.metrics import (
        energy_distance,
        mean_nll,
        mmd,
        mode_weight_error,
        sliced_wasserstein,
        within_mode_sliced_wasserstein,
    )

    ring = ring_mixture()
    good = ring.sample(20, generator=torch.Generator().manual_seed(0))
    bad = good.clone()
    bad[3, 1] = float("nan")
    bad[7, 0] = float("inf")
    pair_metrics = (sliced_wasserstein, energy_distance, mmd)
    for metric in pair_metrics:
        with pytest.raises(ValueError, match=r"expected finite x, found 2 of 20 samples with NaN or infinite values "
                                             r"\(first: sample 3\)"):
            metric(bad, good)
        with pytest.raises(ValueError, match="expected finite y"):
            metric(good, bad)
        with pytest.raises(ValueError, match=r"at least one sample of at least one value, found shape \(0, 2\)"):
            metric(good[:0], good)
    for metric in (mode_weight_error, within_mode_sliced_wasserstein, mean_nll):
        with pytest.raises(ValueError, match="expected finite samples"):
            metric(bad, ring)
    with pytest.raises(ValueError, match="expected finite reference"):
        within_mode_sliced_wasserstein(good, ring, reference=bad)
    assert sliced_wasserstein(good, good) == 0.0


# ------------------------------------------------------------------------------------ diffusers schedulers
def _scheduler(name):
    import score_toolkit.diffusers_schedulers as ds

    sched = getattr(ds, name)(num_train_timesteps=100, beta_end=0.2)
    sched.set_timesteps(5)
    return sched


SCHEDULERS = ["ScoreDPMSolverScheduler", "ScoreAncestralScheduler", "ScoreEulerMaruyamaScheduler"]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedulers_refuse_non_finite_model_outputs(name):
    from score_toolkit.samplers.base import NonFiniteError

    sched = _scheduler(name)
    x, out = torch.randn(3, 2), torch.randn(3, 2)
    out[1, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=rf"{name}.step: model_output holds NaN or infinite values in 1 of 3 "
                                             rf"samples at timestep"):
        sched.step(out, sched.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    out[1, 0] = 0.0  # the refused step left the schedule where it was
    assert torch.isfinite(sched.step(out, sched.timesteps[0], x, generator=torch.Generator().manual_seed(0))
                          .prev_sample).all()


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedulers_refuse_a_generator_list_of_another_length(name):
    sched = _scheduler(name)
    x, out = torch.randn(3, 2), torch.randn(3, 2)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with pytest.raises(ValueError, match=r"expected one generator per sample \(3\), found a list of 2"):
        sched.step(out, sched.timesteps[0], x, generator=gens)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_from_config_refuses_unknown_keyword_arguments(name):
    """from_config(config, solver_ordr=3) built the scheduler without the setting (diffusers drops unknown keyword
    arguments silently); a typo in the config itself was already an error."""
    from diffusers import DDPMScheduler

    import score_toolkit.diffusers_schedulers as ds

    cls = getattr(ds, name)
    with pytest.raises(ValueError, match=rf"unknown key\(s\) 'beta_ed' \(did you mean 'beta_end'\?\) in the keyword "
                                         rf"arguments of {name}.from_config"):
        cls.from_config(DDPMScheduler().config, beta_ed=0.03)
    assert cls.from_config(DDPMScheduler().config, beta_end=0.03).config.beta_end == 0.03


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_from_pretrained_takes_diffusers_loading_arguments(name, tmp_path):
    """diffusers passes what load_config did not use (torch_dtype, use_safetensors) on to from_config, where the
    strict check refused them; DDPMScheduler.from_pretrained takes them."""
    import torch
    from diffusers import DDPMScheduler

    import score_toolkit.diffusers_schedulers as ds

    cls = getattr(ds, name)
    cls.from_config(DDPMScheduler().config).save_pretrained(tmp_path / "scheduler")
    for loading in ({"torch_dtype": torch.float16}, {"use_safetensors": True}):
        DDPMScheduler.from_pretrained(tmp_path, subfolder="scheduler", **loading)  # what diffusers accepts
        assert cls.from_pretrained(tmp_path, subfolder="scheduler", **loading).config == cls.from_pretrained(
            tmp_path, subfolder="scheduler").config
    with pytest.raises(ValueError, match=r"'beta_ed' \(did you mean 'beta_end'\?\)"):  # the others stay strict
        cls.from_pretrained(tmp_path, subfolder="scheduler", beta_ed=0.03)


# ------------------------------------------------------------------------------------ process times
@pytest.mark.parametrize("make", ["VPSDE", "VESDE", "SubVPSDE", "DiscreteVP"])
def test_process_methods_refuse_times_outside_the_range(make):
    import score_toolkit.processes as P

    process = getattr(P, make)()
    x = torch.zeros(2, 3)
    calls = [lambda t: process.marginal(t), lambda t: process.alpha(t), lambda t: process.log_snr(t),
             lambda t: process.diffusion(t), lambda t: process.noise_to_signal(t), lambda t: process.sde(x, t),
             lambda t: process.perturb(x, t, x)]
    for bad in (torch.tensor([-0.5, 0.5]), 2.0, torch.tensor([0.5, float("nan")]), 1.0 + 1e-4):
        for call in calls:
            with pytest.raises(ValueError, match=rf"{make}: expected t in \[0, 1\], found values in"):
                call(bad)
    for good in (0.0, 1.0, 1.0 + 1e-9, torch.tensor([0.0, 0.3]), -1e-9):  # the ends, with rounding
        for call in calls:
            call(good)
    alpha, sigma = process.marginal(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.equal(alpha, torch.exp(process.log_alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))))


@pytest.mark.parametrize("make", ["VPSDE", "VESDE", "SubVPSDE", "DiscreteVP"])
def test_processes_refuse_a_number_of_training_steps_that_is_not_an_int_of_at_least_two(make):
    """num_train_timesteps=1.5 was kept and read as int(1.5) = 1, so the network's index input t * (N - 1) was 0 at
    every time; 0 gave negative indices (VP, VE) or an IndexError (DiscreteVP)."""
    import score_toolkit.processes as P

    for bad in (0, 1, 1.5, -3, True, "1000", float("nan")):
        with pytest.raises(ValueError, match=rf"expected num_train_timesteps to be an int >= 2 .*found {re.escape(repr(bad))}"):
            getattr(P, make)(num_train_timesteps=bad)
    assert getattr(P, make)(num_train_timesteps=1000.0).num_train_timesteps == 1000  # an integral float is that int


def test_scheduler_configs_refuse_a_bad_number_of_training_steps():
    import score_toolkit.diffusers_schedulers as ds
    from score_toolkit.processes import process_from_scheduler_config

    for bad in (0, 1.5):
        with pytest.raises(ValueError, match=rf"scheduler config field num_train_timesteps to be an int >= 2 .*found {bad}"):
            ds.ScoreDPMSolverScheduler(num_train_timesteps=bad)
        with pytest.raises(ValueError, match="scheduler config field num_train_timesteps"):
            process_from_scheduler_config({"_class_name": "ScoreSdeVeScheduler", "sigma_min": 0.01, "sigma_max": 50.0,
                                           "num_train_timesteps": bad})


@pytest.mark.parametrize("make", ["VPSDE", "DiscreteVP"])
def test_perturb_and_add_noise_refuse_what_would_broadcast(make):
    """noise of shape (B, 1) or (1, d), or times for another batch, broadcast silently into x_t (as in diffusers'
    own add_noise); integer samples came back truncated to integers."""
    import score_toolkit.processes as P
    from score_toolkit.diffusers_schedulers import ScoreAncestralScheduler

    process = getattr(P, make)()
    x0, noise, t = torch.randn(3, 2), torch.randn(3, 2), torch.full((3,), 0.5)
    for bad_noise, bad_t in [(noise[:, :1], t), (noise[:1], t), (noise, t[:2]), (noise[:1], torch.full((1,), 0.5))]:
        with pytest.raises(ValueError, match=r"perturb: expected noise of x0's shape \(3, 2\) and t a scalar or of "
                                             r"shape \(3,\), found noise"):
            process.perturb(x0, bad_t, bad_noise)
    with pytest.raises(ValueError, match=r"of shape \(1,\), found noise \(1, 2\) and t \(3,\)"):
        process.perturb(x0[:1], t, noise[:1])  # one sample, three times: it became three samples
    expected = process.marginal(t)[0][:, None] * x0 + process.marginal(t)[1][:, None] * noise
    assert torch.allclose(process.perturb(x0, t, noise), expected)
    sched = ScoreAncestralScheduler()
    with pytest.raises(ValueError, match=r"add_noise: expected noise of the shape of original_samples \(3, 2\), "
                                         r"found \(3, 1\)"):
        sched.add_noise(x0, noise[:, :1], torch.tensor([10]))
    with pytest.raises(ValueError, match=r"get_velocity: expected noise of the shape of sample \(3, 2\), found \(1, 2\)"):
        sched.get_velocity(x0, noise[:1], torch.tensor([10]))
    with pytest.raises(TypeError, match="expected original_samples to be a floating-point tensor, found dtype torch.int64"):
        sched.add_noise(torch.ones(3, 2, dtype=torch.long), noise, torch.tensor([10]))


# ------------------------------------------------------------------------------------ conditioning
def _ring_problem():
    from score_toolkit.analytic import ring_mixture
    from score_toolkit.conditioning import Mask

    process = VPSDE()
    return ring_mixture().score_fn(process), process, Mask(torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("method", ["DPS", "PiGDM", "Replacement"])
def test_inverse_methods_refuse_non_finite_observations_and_noise(method):
    """A NaN observation made every conditional score NaN (reported by the sampler after its first step, blaming the
    score function); noise_std = inf was accepted and the observation ignored."""
    import score_toolkit.conditioning as C

    score_fn, process, mask = _ring_problem()
    y = torch.zeros(3, 2)
    y[1, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"{method}: expected finite observation, found NaN or infinite values in 1 "
                                         r"of 3 samples \(first: sample 1\)"):
        getattr(C, method)(score_fn, process, mask, y, 0.1)
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match=rf"expected a finite noise_std >= 0, found {bad}"):
            getattr(C, method)(score_fn, process, mask, torch.zeros(3, 2), bad)
    out = getattr(C, method)(score_fn, process, mask, torch.zeros(3, 2), 0.1)(torch.randn(3, 2), 0.5)
    assert torch.isfinite(out).all()


def test_guidance_scales_and_pigdm_variance_must_be_finite():
    from score_toolkit.conditioning import ClassifierFreeGuidance, ClassifierGuidance, MatrixOperator, PiGDM

    score_fn, process, mask = _ring_problem()
    for bad in (float("nan"), float("inf"), "2", None):
        with pytest.raises(ValueError, match=rf"ClassifierFreeGuidance: expected guidance_scale to be a finite number, "
                                             rf"found {re.escape(repr(bad))}"):
            ClassifierFreeGuidance(lambda x, t, labels: -x, 0, bad, null_label=3)
        with pytest.raises(ValueError, match=r"ClassifierGuidance: expected scale to be a finite number"):
            ClassifierGuidance(score_fn, lambda x, t: x, 0, scale=bad)
    assert ClassifierFreeGuidance(lambda x, t, labels: -x, 0, -0.5, null_label=3).guidance_scale == -0.5
    with pytest.raises(ValueError, match=r"expected a finite data_variance > 0, found inf"):
        PiGDM(score_fn, process, mask, torch.zeros(2), 0.1, data_variance=float("inf"))
    with pytest.raises(ValueError, match=r"MatrixOperator: expected finite matrix entries, found NaN or infinite values "
                                         r"in 1 of 4 values"):
        MatrixOperator(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


def test_conditional_score_refuses_observation_settings_without_an_observation():
    from score_toolkit.conditioning import conditional_score

    score_fn, process, mask = _ring_problem()
    for kw in (dict(noise_std=0.5), dict(inverse_options={"scale": 2.0})):
        with pytest.raises(ValueError, match=r"noise_std and inverse_options describe an observation .*without one"):
            conditional_score(score_fn, process, **kw)
    assert conditional_score(score_fn, process) is score_fn


def test_pipeline_refuses_ignored_observation_settings_and_bad_callbacks():
    """noise_std and inverse_method were ignored without an observation, and with the samplers that take the
    operator themselves (repaint, imputation: a noise-free observation); a bad inverse_method was ignored without an
    observation; a non-callable callback failed after the first step."""
    pipe = vector_pipeline()
    pipe.set_progress_bar_config(disable=True)
    run = dict(sampler="euler_maruyama", num_inference_steps=2)
    for kw in (dict(noise_std=0.5), dict(inverse_method="dps")):
        with pytest.raises(ValueError, match=r"noise_std and inverse_method describe an observation .*found "
                                             r"\{'(noise_std|inverse_method)'.*without one"):
            pipe(2, **run, **kw)
    with pytest.raises(ValueError, match=r"expected inverse_method in \['dps', 'pigdm', 'replacement'\], found 'bogus'"):
        pipe(2, inverse_method="bogus", **run)
    observed = dict(mask=torch.tensor([1.0, 0.0]), observation=torch.zeros(2))
    for name in ("repaint", "imputation"):
        for kw in (dict(noise_std=0.5), dict(inverse_method="dps")):
            with pytest.raises(ValueError, match=rf"sampler '{name}' takes the operator and a noise-free observation "
                                                 r"itself: noise_std and inverse_method do not apply"):
                pipe(2, sampler=name, num_inference_steps=2, **observed, **kw)
        assert pipe(2, sampler=name, num_inference_steps=2, **observed).samples.shape == (2, 2)
        bad = torch.tensor([0.0, float("nan")])
        with pytest.raises(ValueError, match=rf"sampler '{name}': expected finite observation"):
            pipe(2, sampler=name, num_inference_steps=2, mask=observed["mask"], observation=bad)
    assert pipe(2, noise_std=0.5, **observed, **run).samples.shape == (2, 2)
    with pytest.raises(TypeError, match="expected callback to be callable or None, found int"):
        pipe(2, callback=3, **run)


def test_process_and_score_sde_scheduler_from_config_refuse_unknown_keyword_arguments():
    from score_toolkit.schedulers import scheduler_for

    process = VPSDE()
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'beta_mx' \(did you mean 'beta_max'\?\) in the keyword "
                                         r"arguments of VPSDE.from_config"):
        VPSDE.from_config(process.config, beta_mx=10.0)
    assert VPSDE.from_config(process.config, beta_max=10.0).config.beta_max == 10.0
    sched = scheduler_for(process, "epsilon", "t")
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'predicton_type' .*ScoreSDEScheduler.from_config"):
        type(sched).from_config(sched.config, predicton_type="sample")
    assert type(sched).from_config(sched.config, prediction_type="sample").config.prediction_type == "sample"
    import torch

    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(VPSDE.from_config(process.config, torch_dtype=torch.float16).config) == public(process.config)
    assert public(type(sched).from_config(sched.config, use_safetensors=True).config) == public(sched.config)


@pytest.mark.parametrize("make, key", [("VESDE", "sigma_min"), ("VESDE", "t_min"), ("VPSDE", "beta_max"),
                                       ("SubVPSDE", "beta_min"), ("VPSDE", "t_min")])
def test_process_parameters_must_be_numbers(make, key):
    """VESDE(sigma_min="0.01") passed the range check (float("0.01")) and kept the string in its config, which was
    saved as a string; a 0-d tensor would not save at all."""
    import numpy as np

    import score_toolkit.processes as P

    good = {"sigma_min": 0.02, "t_min": 0.01, "beta_max": 30.0, "beta_min": 0.2}[key]
    for bad in (str(good), torch.tensor(good)):
        with pytest.raises(TypeError, match=rf"expected {key} to be a real number, found (str|Tensor)"):
            getattr(P, make)(**{key: bad})
    assert float(getattr(P, make)(**{key: np.float64(good)}).config[key]) == good
