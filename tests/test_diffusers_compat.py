"""diffusers checkpoints in score_toolkit and score_toolkit checkpoints in diffusers.

Folders are written by diffusers itself (DDPMPipeline, DDIMPipeline, ScoreSdeVePipeline) with tiny random
UNet2DModels: every registered sampler runs on them in ScorePipeline, the network receives exactly the time
input the scheduler config implies, and a score_toolkit export samples in plain diffusers DDPMPipeline with
the same trajectory as score_toolkit's ancestral sampler."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    ScoreSdeVePipeline,
    ScoreSdeVeScheduler,
    UNet2DModel,
)

from score_toolkit.hub import export_pipeline
from score_toolkit.pipeline import ScorePipeline
from score_toolkit.processes import VESDE, DiscreteVP
from score_toolkit.registry import get_sampler_class, list_samplers

SAMPLERS = list_samplers()
# small settings per sampler: batch 2, a few steps (samplers added later get num_steps=3 if they have it)
TINY = {
    "annealed_langevin": {"num_levels": 2, "steps_per_level": 2},
    "langevin": {"num_steps": 3, "t": 0.5},
    "pf_ode": {"method": "euler", "num_steps": 3},
    "predictor_corrector": {"num_steps": 3},
    "tds": {"num_steps": 3, "num_particles": 2, "twist": "none"},  # unconditional: nothing observed
    "importance_ode": {"method": "euler", "num_steps": 3, "num_particles": 2, "likelihood": "none"},
}


# loose tolerances of adaptive samplers, by option name
LOOSE = {"rtol": 0.05, "atol": 0.05, "eps_rel": 0.5, "eps_abs": 0.5}


def tiny_options(name: str) -> dict:
    if name in TINY:
        return dict(TINY[name])
    options = get_sampler_class(name).options
    if "num_steps" in options and not get_sampler_class(name).properties.adaptive:
        return {"num_steps": 3}
    return {k: v for k, v in LOOSE.items() if k in options}


def tiny_unet(**kw):
    torch.manual_seed(0)
    cfg = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
               down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    cfg.update(kw)
    return UNet2DModel(**cfg).eval()


FOLDERS = {
    "ddpm-epsilon-linear": lambda: DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()),
    "ddpm-v-scaled_linear": lambda: DDPMPipeline(
        unet=tiny_unet(), scheduler=DDPMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear",
                                                  beta_start=0.00085, beta_end=0.012)),
    "ddim-sample-cosine": lambda: DDIMPipeline(
        unet=tiny_unet(), scheduler=DDIMScheduler(prediction_type="sample", beta_schedule="squaredcos_cap_v2")),
    # score-SDE VE layout: the UNet embeds log(sigma) with Fourier features and divides its output by sigma
    "sde-ve": lambda: ScoreSdeVePipeline(unet=tiny_unet(time_embedding_type="fourier", flip_sin_to_cos=True),
                                         scheduler=ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=10.0)),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, build in FOLDERS.items():
        path = tmp_path_factory.mktemp(name)
        build().save_pretrained(path)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def pipelines(folders):
    return {kind: ScorePipeline.from_pretrained(path) for kind, path in folders.items()}


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("kind", list(FOLDERS))
def test_diffusers_folders_sample_with_every_registered_sampler(pipelines, kind, sampler):
    cls = get_sampler_class(sampler)
    if cls.properties.needs_energy:
        pytest.skip(f"{sampler} needs an energy network; diffusers UNets predict epsilon/v/x0/score")
    pipe = pipelines[kind]
    out = pipe(batch_size=2, sampler=sampler, sampler_options=tiny_options(sampler),
               generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="pt")
    assert out.samples.shape == (2, 1, 8, 8) and out.images.shape == (2, 1, 8, 8)
    assert bool(torch.isfinite(out.samples).all())
    assert out.nfe >= 1
    again = pipe(batch_size=2, sampler=sampler, sampler_options=tiny_options(sampler),
                 generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="pt")
    assert torch.equal(again.samples, out.samples)


def test_diffusers_folders_map_to_the_right_process(folders):
    expected = {
        "ddpm-epsilon-linear": (DDPMScheduler(), "epsilon"),
        "ddpm-v-scaled_linear": (DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                                 "v_prediction"),
        "ddim-sample-cosine": (DDPMScheduler(beta_schedule="squaredcos_cap_v2"), "sample"),
    }
    for kind, (table, prediction_type) in expected.items():
        process, pred, time_input = ScorePipeline.from_pretrained(folders[kind]).spec
        assert isinstance(process, DiscreteVP) and (pred, time_input) == (prediction_type, "index")
        assert torch.equal(process.alphas_cumprod.float(), table.alphas_cumprod)
    process, pred, time_input = ScorePipeline.from_pretrained(folders["sde-ve"]).spec
    assert process == VESDE(sigma_min=0.01, sigma_max=10.0, t_min=1e-5, num_train_timesteps=2000)
    assert (pred, time_input) == ("score", "sigma")


def test_the_network_gets_its_time_input_as_a_float_tensor(folders):
    """UNet2DModel(x, 0.7) with a Python float silently becomes timestep 0; the pipeline hands the network a
    float tensor: the fractional table index of a DDPM model, sigma itself for a score-SDE VE model."""
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe = ScorePipeline.from_pretrained(folders["ddpm-epsilon-linear"])
    score_fn = pipe.score_function()
    n = pipe.spec[0].num_train_timesteps
    t = torch.full((2,), 1.7 / n)  # table index t N - 1 = 0.7
    with torch.no_grad():
        got = score_fn.raw(x, t)
        assert torch.allclose(got, pipe.unet(x, torch.tensor([0.7, 0.7])).sample, atol=1e-5)
        trap = pipe.unet(x, 0.7).sample
        assert torch.equal(trap, pipe.unet(x, torch.tensor(0)).sample)  # the trap: 0.7 became 0
        assert not torch.allclose(got, trap, atol=1e-4)

        ve = ScorePipeline.from_pretrained(folders["sde-ve"])
        score_fn = ve.score_function()
        t = torch.tensor([0.3, 0.8])
        sigma = ve.spec[0].sigma(t)
        assert torch.allclose(score_fn(x, t), ve.unet(x, sigma).sample)  # the output is the score as is


def test_our_export_samples_in_plain_diffusers_like_our_ancestral_sampler(tmp_path):
    """A DiscreteVP epsilon network exported by score_toolkit loads in diffusers' DDPMPipeline (no score_toolkit
    code involved) and its DDPM loop (N steps, posterior variance, last step to the predicted x_0) is the
    ancestral sampler with N - 1 steps on the table and a final Tweedie step."""
    n = 50
    process = DiscreteVP(num_train_timesteps=n, beta_start=1e-3, beta_end=0.2)
    folder = export_pipeline(tiny_unet(), process, "epsilon", "index", tmp_path / "export")
    plain = DDPMPipeline.from_pretrained(folder)
    assert type(plain.scheduler) is DDPMScheduler
    plain.set_progress_bar_config(disable=True)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    theirs = plain(batch_size=3, num_inference_steps=n, generator=gens(), output_type="np").images
    ours = ScorePipeline.from_pretrained(folder)(batch_size=3, sampler="ancestral", num_steps=n - 1, denoise=True,
                                                 generator=gens(), output_type="np").images
    assert theirs.shape == ours.shape == (3, 8, 8, 1)
    assert abs(theirs - ours).max() < 1e-4
