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
