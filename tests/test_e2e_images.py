"""End to end at small size, as a user at image scale runs it: images written as an image folder -> Hugging Face
``datasets`` (imagefolder) -> the reduced NCSN++-style preset trained with ``accelerate launch`` on 2 CPU
processes in bf16 (the launcher's setting) -> ``kill -9`` -> ``--resume`` -> export -> ``score-toolkit sample``
writes a PNG folder and an ``.npz``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from PIL import Image

pytest.importorskip("datasets")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_images(folder, n=32, size=8):
    """Two kinds of 8x8 RGB images (a bright square on a dark ground, in two colours): a pattern to learn."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.full((size, size, 3), 20, np.uint8)
        colour = (230, 60, 40) if i % 2 else (40, 90, 230)
        r, c = rng.integers(0, size - 4, 2)
        img[r:r + 4, c:c + 4] = colour
        Image.fromarray(img).save(folder / f"img_{i:03d}.png")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in their own process groups, so killing the
    launcher's group would leave them running)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_9(proc) -> None:
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _launch(cfg_file, *extra, log):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "score_toolkit.cli", "train", "--config", str(cfg_file), "--no-progress", "--no-fit-grid", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.slow
def test_image_folder_to_datasets_to_bf16_two_process_training_kill_resume_export_sample(tmp_path):
    images = tmp_path / "images"
    _write_images(images)
    run = tmp_path / "run"
    steps = 200
    cfg = {
        "output_dir": str(run),
        "seed": 0,
        "data": {"name": "hf", "options": {"path": "imagefolder", "data_dir": str(images), "image_size": 8,
                                           "random_flip": True, "num_workers": 1,
                                           "cache_dir": str(tmp_path / "hf-cache")}},
        "process": {"name": "VESDE", "options": {"sigma_min": 0.01, "sigma_max": 5.0}},
        "model": {"name": "UNet2DModel", "preset": "ncsnpp_32_small", "prediction_type": "score",
                  "time_input": "sigma",
                  "options": {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
                              "down_block_types": ["SkipDownBlock2D", "AttnSkipDownBlock2D"],
                              "up_block_types": ["AttnSkipUpBlock2D", "SkipUpBlock2D"]}},
        "objective": {"name": "continuous_dsm"},
        "train": {"steps": steps, "batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 20, "lr_scheduler": "cosine",
                  "cpu": True, "checkpoint_every": 50, "log_every": 25, "ema_decay": 0.99},
        "export": {"sampler": "dpmpp_2m", "sampler_options": {"num_steps": 10}, "num_samples": 8},
    }
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))

    # 1. train until the checkpoint of step 100 is complete, then kill -9 every process of the launch
    proc = _launch(cfg_file, log=tmp_path / "first.log")
    ckpt = run / "checkpoints" / "step_0000100" / "MANIFEST.json"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), (proc.poll(), (tmp_path / "first.log").read_text()[-4000:])
    _kill_9(proc)
    time.sleep(3)  # nothing may still be running: no step after the kill, no export
    assert not (run / "pipeline").exists()
    assert not (run / "checkpoints" / f"step_{steps:07d}").exists()
    killed_at = max(int(p.name[5:]) for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert 100 <= killed_at < steps

    # 2. resume with the same command: the run ends and exports
    proc = _launch(cfg_file, "--resume", log=tmp_path / "resume.log")
    proc.wait(timeout=400)
    assert proc.returncode == 0, (tmp_path / "resume.log").read_text()[-4000:]
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["mixed_precision"] == "bf16"  # the launcher's setting, recorded
    state = json.loads((run / "checkpoints" / f"step_{steps:07d}" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["step"] == steps and state["lr_scheduler"]["last_epoch"] == steps + 1
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    export = run / "pipeline"
    assert (export / "model_index.json").is_file() and (export / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert "bf16" in (export / "README.md").read_text()

    # 3. sample the export: a PNG folder and an .npz for FID tools
    samples = tmp_path / "samples"
    cmd = [sys.executable, "-m", "score_toolkit.cli", "sample", str(export), "--num-samples", "12", "--batch-size", "4",
           "--steps", "10", "--cpu", "--image-files", "--output-dir", str(samples), "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    pngs = sorted((samples / "images").glob("*.png"))
    assert len(pngs) == 12 and Image.open(pngs[0]).size == (8, 8) and Image.open(pngs[0]).mode == "RGB"
    arr = np.load(samples / "samples.npz")["arr_0"]
    assert arr.shape == (12, 8, 8, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr[0], np.asarray(Image.open(pngs[0])))
