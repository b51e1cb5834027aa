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
    # bfloat16 has 8 bits of mantissa: close to the float32 run, not equal
    assert not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, atol=0.1 * float(ref.abs().max()), rtol=0)
