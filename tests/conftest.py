"""Test-suite settings: one intra-op thread (the score functions here are small; on 2 loaded cores
extra threads only add contention) and no Hugging Face Hub access."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
