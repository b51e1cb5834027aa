"""Bad input at the Python API's public boundaries is a clear error saying what was expected and what was found
(or is converted when its meaning is unambiguous), instead of a raw error from deep inside or a silent result."""

from __future__ import annotations

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
