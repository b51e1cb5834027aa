"""Test-suite settings: one intra-op thread (the score functions here are small; on 2 loaded cores
extra threads only add contention) and no Hugging Face Hub access."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)



import sys  # noqa: E402

import pytest  # noqa: E402


def _reset_accelerate_state():
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one state (device, mixed precision) per process and refuses a second Accelerator with
    another precision; the library uses only Accelerate's public API and says so. Training tests that change
    the precision reset it before and after (as Accelerate's own test-suite does); modules opt in with
    ``pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")``."""
    _reset_accelerate_state()
    yield
    _reset_accelerate_state()
