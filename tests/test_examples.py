"""The scripts in examples/ run (with --quick, on tiny checkpoints) and produce what they say."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

from score_toolkit import registry
from score_toolkit.distributed import load_samples
from score_toolkit.models import ScoreMLP
from score_toolkit.pipeline import ScorePipeline
from score_toolkit.processes import VPSDE
from score_toolkit.schedulers import scheduler_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, argv: list[str]) -> int:
    module = runpy.run_path(str(EXAMPLES / name), run_name="example")
    return module["main"](argv)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    folder = tmp_path_factory.mktemp("ddpm")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100, beta_end=0.2)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vector_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vp")
    ScorePipeline(unet=ScoreMLP(2, hidden_dim=16, num_layers=1), scheduler=scheduler_for(VPSDE(), "epsilon", "t")
                  ).save_pretrained(folder)
    return folder


def test_examples_folder_has_the_four_examples():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == [
        "compare_samplers.py", "custom_sampler.py", "distributed_sampling.py", "swap_scheduler.py"]


@pytest.mark.parametrize("kind", ["image", "vector"])
def test_compare_samplers(tmp_path, image_folder, vector_folder, kind, capsys):
    out = tmp_path / "cmp.png"
    folder = image_folder if kind == "image" else vector_folder
    assert run_example("compare_samplers.py", ["--quick", "--checkpoint", str(folder), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("ancestral", "euler_maruyama", "dpmpp_2m"))
    width, height = Image.open(out).size
    assert width > 2.5 * height  # three panels side by side


def test_swap_scheduler(tmp_path, image_folder, capsys):
    out = tmp_path / "swap.png"
    assert run_example("swap_scheduler.py", ["--quick", "--checkpoint", str(image_folder), "--output", str(out)]) == 0
    assert "identical images" in capsys.readouterr().out and out.is_file()


def test_distributed_sampling(tmp_path, image_folder, capsys):
    out = tmp_path / "dist"
    argv = ["--quick", "--checkpoint", str(image_folder), "--output-dir", str(out), "--cpu"]
    assert run_example("distributed_sampling.py", argv) == 0
    assert load_samples(out).shape == (6, 1, 8, 8)
    assert run_example("distributed_sampling.py", argv) == 0  # the re-run finds every shard complete
    assert "0 shard(s) written" in capsys.readouterr().out.splitlines()[-2]


def test_custom_sampler(vector_folder, capsys):
    try:
        assert run_example("custom_sampler.py", ["--quick", "--checkpoint", str(vector_folder)]) == 0
        assert "pf_heun_example" in registry.list_samplers()
    finally:
        registry._REGISTRY.unregister("pf_heun_example")
    lines = capsys.readouterr().out.splitlines()
    order = float(next(line for line in lines if line.startswith("observed order")).split()[2])
    assert order > 1.5  # second order, measured against a tight adaptive solve of the same ODE
