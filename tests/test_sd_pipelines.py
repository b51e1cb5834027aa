"""diffusers' Stable Diffusion pipelines (text-to-image, img2img, inpainting) driving score_toolkit's schedulers,
with tiny components built here (a CLIP text encoder and a tokenizer from a local vocabulary, a UNet and a VAE;
nothing from the Hub). Our DPM-Solver at orders 1 and 2 gives diffusers' DPMSolverMultistepScheduler output
for the same config and noise."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from score_toolkit import diffusers_schedulers as ds  # noqa: E402

OURS = [ds.ScoreAncestralScheduler, ds.ScoreEulerMaruyamaScheduler, ds.ScoreDPMSolverScheduler]
# Stable Diffusion's table (scaled_linear 0.00085 .. 0.012, 1000 entries), as its own scheduler config says
SD_TABLE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
STEPS = 10


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=16).eval()
    scheduler = DDIMScheduler(**SD_TABLE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _pipe(cls, components, scheduler):
    pipe = cls(**{**components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images():
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, 16, 16, generator=g)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1.0  # repaint the centre
    return image, mask


def _run(kind, components, scheduler, seed=0, strength=0.6):
    image, mask = _images()
    common = dict(prompt="a cat", num_inference_steps=STEPS, guidance_scale=3.0, output_type="np",
                  generator=torch.Generator().manual_seed(seed))
    calls = []

    def count(pipe, i, t, kwargs):
        calls.append(float(t))
        return kwargs

    common["callback_on_step_end"] = count
    if kind == "txt2img":
        pipe = _pipe(StableDiffusionPipeline, components, scheduler)
        out = pipe(height=16, width=16, **common)
    elif kind == "img2img":
        pipe = _pipe(StableDiffusionImg2ImgPipeline, components, scheduler)
        out = pipe(image=image, strength=strength, **common)
    else:
        pipe = _pipe(StableDiffusionInpaintPipeline, components, scheduler)
        out = pipe(image=image, mask_image=mask, strength=strength, height=16, width=16, **common)
    return out.images, calls, pipe


@pytest.mark.parametrize("kind", ["txt2img", "img2img", "inpaint"])
@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_sd_pipelines_run_our_schedulers(components, cls, kind):
    sched = cls.from_config(components["scheduler"].config)
    images, calls, pipe = _run(kind, components, sched)
    assert images.shape == (1, 16, 16, 3) and bool(((images >= 0) & (images <= 1)).all())
    expected = STEPS if kind == "txt2img" else int(STEPS * 0.6)
    assert len(calls) == expected
    assert calls == pipe.scheduler.timesteps[STEPS - expected:].tolist()  # the last steps of the schedule
    again, _, _ = _run(kind, components, cls.from_config(components["scheduler"].config))
    assert (images == again).all()  # same generator, same image
    if cls is not ds.ScoreDPMSolverScheduler and kind != "inpaint":
        other, _, _ = _run(kind, components, cls.from_config(components["scheduler"].config), seed=1)
        assert not (images == other).all()


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
@pytest.mark.parametrize("order", [1, 2])
def test_our_dpm_solver_gives_diffusers_output_mid_schedule(components, kind, order):
    """Same config, same noise: the img2img / inpainting output of ScoreDPMSolverScheduler equals that of
    diffusers' DPMSolverMultistepScheduler (its coefficients in float32, ours in float64)."""
    cfg = DPMSolverMultistepScheduler(**SD_TABLE, solver_order=order, timestep_spacing="linspace",
                                      final_sigmas_type="zero", solver_type="midpoint").config
    theirs, _, _ = _run(kind, components, DPMSolverMultistepScheduler.from_config(cfg))
    ours, _, pipe = _run(kind, components, ds.ScoreDPMSolverScheduler.from_config(cfg))
    assert isinstance(pipe.scheduler, ds.ScoreDPMSolverScheduler)
    diff = float(abs(theirs - ours).max())
    assert diff < 1e-4, diff
    # and a different solver is visibly different (the comparison can fail)
    euler, _, _ = _run(kind, components, ds.ScoreEulerMaruyamaScheduler.from_config(cfg))
    assert float(abs(theirs - euler).max()) > 1e-3
