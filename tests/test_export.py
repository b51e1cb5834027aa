"""Hub-style export: scheduler configs that encode (process, prediction type, time input), folders that round-trip
exactly through score_toolkit and diffusers, plain-diffusers sampling of DDPM-compatible models, model cards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, ScoreSdeVeScheduler, UNet2DModel

from score_toolkit import hub
from score_toolkit.models import CheckpointError, EnergyMLP, ScoreMLP
from score_toolkit.processes import VESDE, VPSDE, DiscreteVP, SubVPSDE
from score_toolkit.schedulers import ScoreSDEScheduler, read_scheduler_config, scheduler_for


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)


def tiny_mlp(cls=ScoreMLP, **kw):
    torch.manual_seed(0)
    return cls(2, hidden_dim=16, num_layers=1, **kw)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------ schedulers
@pytest.mark.parametrize(
    "process, prediction_type, time_input, expected",
    [
        (DiscreteVP(), "epsilon", "index", DDPMScheduler),
        (DiscreteVP(beta_schedule="squaredcos_cap_v2"), "v_prediction", "index", DDPMScheduler),
        (DiscreteVP(), "sample", "index", DDPMScheduler),
        (DiscreteVP(), "epsilon", "t", ScoreSDEScheduler),
        (DiscreteVP(), "score", "index", ScoreSDEScheduler),
        (VESDE(sigma_min=0.01, sigma_max=50.0), "score", "sigma", ScoreSdeVeScheduler),
        (VESDE(t_min=0.0), "score", "sigma", ScoreSDEScheduler),  # sampling_eps cannot say t_min = 0
        (VESDE(), "epsilon", "sigma", ScoreSDEScheduler),
        (VPSDE(), "epsilon", "index", ScoreSDEScheduler),
        (VPSDE(beta_max=10.0), "epsilon", "t", ScoreSDEScheduler),
        (SubVPSDE(), "score", "t", ScoreSDEScheduler),
        (VPSDE(), "energy", "t", ScoreSDEScheduler),
    ],
)
def test_scheduler_round_trip(tmp_path, process, prediction_type, time_input, expected):
    sched = scheduler_for(process, prediction_type, time_input)
    assert type(sched) is expected
    sched.save_pretrained(tmp_path)
    reloaded = type(sched).from_pretrained(tmp_path)
    for s in (sched, reloaded, json.loads((tmp_path / "scheduler_config.json").read_text())):
        p, pred, ti = read_scheduler_config(s)
        assert (p, pred, ti) == (process, prediction_type, time_input)


def test_score_sde_scheduler_contract():
    s = scheduler_for(VESDE(sigma_max=20.0), "score", "t")
    assert type(s) is ScoreSDEScheduler
    assert s.init_noise_sigma == 20.0 and s.order == 1 and s.config_name == "scheduler_config.json"
    s.set_timesteps(4)
    assert torch.allclose(s.timesteps, torch.tensor([1.0, 0.75, 0.5, 0.25]), atol=1e-5)
    assert s.time_grid[-1] == pytest.approx(1e-5) and len(s.time_grid) == 5
    x = torch.randn(3, 2)
    assert s.scale_model_input(x, s.timesteps[0]) is x
    with pytest.raises(ValueError, match="expected prediction_type"):
        ScoreSDEScheduler(process={**VPSDE().config, "_class_name": "VPSDE"}, prediction_type="noise")
    with pytest.raises(TypeError, match="scheduler_for"):
        ScoreSDEScheduler(process=VPSDE())
    with pytest.raises(ValueError, match="with a _class_name"):
        ScoreSDEScheduler(process=dict(VPSDE().config))


def test_read_scheduler_config_errors():
    with pytest.raises(ValueError, match="field '_class_name': cannot map 'KarrasVeScheduler'"):
        read_scheduler_config({"_class_name": "KarrasVeScheduler", "sigma_min": 0.02})
    with pytest.raises(ValueError, match="field 'prediction_type' of DDPMScheduler"):
        read_scheduler_config({**DDPMScheduler().config, "_class_name": "DDPMScheduler", "prediction_type": "flow"})
    with pytest.raises(ValueError, match="field 'process'"):
        read_scheduler_config({"_class_name": "ScoreSDEScheduler", "process": None})
    with pytest.raises(ValueError, match="field 'time_input'"):
        read_scheduler_config({"_class_name": "ScoreSDEScheduler", "process": {"_class_name": "VPSDE"}, "time_input": "x"})
    with pytest.raises(ValueError, match="beta_schedule"):
        read_scheduler_config({"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"})
    # a DDIM config reads as the same discrete process
    from diffusers import DDIMScheduler

    assert read_scheduler_config(DDIMScheduler()) == (DiscreteVP(), "epsilon", "index")


# ------------------------------------------------------------------------------------ export and load
def _check_folder(folder):
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert all(f.endswith(hub.ALLOWED_SUFFIXES) for f in files), files
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json", "README.md"} <= set(files)
    return files


@pytest.mark.parametrize(
    "make, process, prediction_type, time_input",
    [
        (tiny_mlp, VPSDE(), "epsilon", "t"),
        (lambda: tiny_mlp(EnergyMLP, time_embedding="linear"), SubVPSDE(), "energy", "t"),
        (tiny_mlp, VESDE(), "score", "sigma"),
        (tiny_unet, DiscreteVP(), "epsilon", "index"),
    ],
)
def test_export_round_trips_through_score_toolkit_and_diffusers(tmp_path, make, process, prediction_type, time_input):
    model = make()
    folder = hub.export_pipeline(model, process, prediction_type, time_input, tmp_path / "out",
                                 {"model_name": "tiny", "dataset_name": "ring"})
    _check_folder(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    loaded = hub.load_pipeline_components(folder)
    assert type(loaded.model) is type(model) and same_weights(loaded.model, model)
    assert (loaded.process, loaded.prediction_type, loaded.time_input) == (process, prediction_type, time_input)
    assert not loaded.model.training
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    assert type(pipe.unet) is type(model) and same_weights(pipe.unet, model)
    assert read_scheduler_config(pipe.scheduler) == (process, prediction_type, time_input)
    # the loaded network computes what the original computes
    x = torch.randn(4, *((2,) if not isinstance(model, UNet2DModel) else (1, 8, 8)))
    t = torch.full((4,), 0.5)
    with torch.enable_grad() if prediction_type == "energy" else torch.no_grad():
        out_a, out_b = model(x, t), loaded.model(x, t)
    out_a, out_b = getattr(out_a, "sample", out_a), getattr(out_b, "sample", out_b)
    assert torch.equal(out_a, out_b)


# What a user does in a fresh interpreter: `import score_toolkit` (nothing else from score_toolkit) and
# diffusers' DiffusionPipeline.from_pretrained on exported folders, then sampling.
_FRESH_PROCESS_LOAD = textwrap.dedent("""
    import json, sys
    import score_toolkit
    assert "torch" not in sys.modules, "import score_toolkit must stay light"
    from diffusers import DiffusionPipeline
    import torch
    from safetensors.torch import load_file

    folders = json.loads(sys.argv[1])
    pipes = {}
    for name, folder in folders.items():
        before = sorted(m for m in sys.modules if m.startswith("score_toolkit"))
        assert "score_toolkit.pipeline" not in before and "score_toolkit.hub" not in before, before
        pipe = DiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        stored = load_file(folder + "/unet/diffusion_pytorch_model.safetensors")
        state = pipe.unet.state_dict()
        assert state.keys() == stored.keys() and all(torch.equal(state[k], stored[k]) for k in stored), name
        pipes[name] = pipe
    out = {}
    # plain diffusers sampling: the epsilon DDPM image model in its DDPMPipeline
    images = pipes["unet_ddpm"](batch_size=2, num_inference_steps=5, output_type="np",
                                generator=torch.Generator().manual_seed(0)).images
    out["unet_ddpm"] = [list(images.shape), bool(((images >= 0) & (images <= 1)).all())]
    # score_toolkit components loaded by diffusers: sample them with a score_toolkit sampler
    from score_toolkit import ScorePipeline
    for name in ("mlp", "unet_vp"):
        pipe = pipes[name]
        res = ScorePipeline(unet=pipe.unet, scheduler=pipe.scheduler)(
            batch_size=3, sampler="euler_maruyama", num_inference_steps=4, output_type="pt",
            generator=torch.Generator().manual_seed(0))
        out[name] = [list(res.samples.shape), bool(torch.isfinite(res.samples).all()), type(pipe).__name__,
                     type(pipe.unet).__name__, type(pipe.scheduler).__name__]
    print(json.dumps(out))
""")


def test_exported_folders_load_in_diffusers_after_a_plain_import_score_toolkit(tmp_path):
    folders = {
        "mlp": hub.export_pipeline(tiny_mlp(), VPSDE(), "epsilon", "t", tmp_path / "mlp"),
        "unet_vp": hub.export_pipeline(tiny_unet(), VPSDE(), "epsilon", "t", tmp_path / "unet_vp"),
        "unet_ddpm": hub.export_pipeline(tiny_unet(), DiscreteVP(num_train_timesteps=50), "epsilon", "index",
                                         tmp_path / "unet_ddpm"),
    }
    indexes = {k: json.loads((f / "model_index.json").read_text()) for k, f in folders.items()}
    assert indexes["mlp"]["unet"] == ["score_toolkit.models.mlp", "ScoreMLP"]
    assert indexes["unet_vp"]["scheduler"] == ["score_toolkit.schedulers", "ScoreSDEScheduler"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_LOAD, json.dumps({k: str(f) for k, f in folders.items()})],
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["unet_ddpm"] == [[2, 8, 8, 1], True]
    assert out["mlp"] == [[3, 2], True, "DDPMPipeline", "ScoreMLP", "ScoreSDEScheduler"]
    assert out["unet_vp"] == [[3, 1, 8, 8], True, "DDPMPipeline", "UNet2DModel", "ScoreSDEScheduler"]


def test_component_modules_are_registered_without_running_them():
    """After `import score_toolkit` the modules diffusers looks up are in sys.modules but have not run (no torch),
    and tools that read __file__ of every module (inspect.getmodule, which torch calls while importing) do not
    run them either."""
    code = textwrap.dedent("""
        import inspect, json, sys
        import score_toolkit
        names = score_toolkit.COMPONENT_MODULES
        registered = [n in sys.modules for n in names]
        inspect.getmodule(inspect)   # walks sys.modules reading __file__
        ran = [type(sys.modules[n]).__name__ != "_DeferredModule" for n in names]
        torch_before = "torch" in sys.modules
        from score_toolkit.schedulers import ScoreSDEScheduler
        import score_toolkit.models.mlp as mlp
        star = {}
        exec("from score_toolkit.diffusers_schedulers import *", star)  # __all__ runs a deferred module
        print(json.dumps({"registered": registered, "ran": ran, "torch_before": torch_before,
                          "star": "ScoreDPMSolverScheduler" in star,
                          "same": sys.modules["score_toolkit.schedulers"].ScoreSDEScheduler is ScoreSDEScheduler,
                          "module": mlp.ScoreMLP.__module__, "mlp_is_registered": mlp is sys.modules[names[0]]}))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out == {"registered": [True] * 3, "ran": [False] * 3, "torch_before": False, "star": True, "same": True,
                   "module": "score_toolkit.models.mlp", "mlp_is_registered": True}


def test_epsilon_vp_image_model_samples_in_plain_diffusers(tmp_path):
    folder = hub.export_pipeline(tiny_unet(), DiscreteVP(num_train_timesteps=50), "epsilon", "index", tmp_path / "out")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    pipe = DDPMPipeline.from_pretrained(str(folder))
    out = pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 8, 8, 1) and (out.images >= 0).all() and (out.images <= 1).all()
    # the process diffusers uses is the one score_toolkit reads
    p = hub.load_pipeline_components(folder).process
    assert torch.allclose(p.alphas_cumprod, pipe.scheduler.alphas_cumprod.double(), atol=1e-7)


def test_existing_folder_and_atomicity(tmp_path, monkeypatch):
    model = tiny_mlp()
    folder = hub.export_pipeline(model, VPSDE(), "epsilon", "t", tmp_path / "out")
    with pytest.raises(FileExistsError, match="already exists: pass overwrite=True"):
        hub.export_pipeline(model, VPSDE(), "epsilon", "t", folder)
    other = ScoreMLP(2, hidden_dim=8, num_layers=1)

    def broken_card(*args, **kwargs):
        raise RuntimeError("crash while writing the card")

    monkeypatch.setattr(hub, "render_model_card", broken_card)
    with pytest.raises(RuntimeError, match="crash while writing"):
        hub.export_pipeline(other, VPSDE(), "epsilon", "t", folder, overwrite=True)
    monkeypatch.undo()
    # the old folder is untouched and no temporary folder is left behind
    assert same_weights(hub.load_pipeline_components(folder).model, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    hub.export_pipeline(other, VPSDE(), "epsilon", "t", folder, overwrite=True)
    assert same_weights(hub.load_pipeline_components(folder).model, other)


def test_loading_refuses_foreign_code_and_broken_weights(tmp_path):
    folder = hub.export_pipeline(tiny_mlp(), VPSDE(), "epsilon", "t", tmp_path / "out")
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps({**index, "unet": ["evil_module_xyz", "ScoreMLP"]}))
    with pytest.raises(ValueError, match="code named by a folder is never imported"):
        hub.load_pipeline_components(folder)
    assert "evil_module_xyz" not in sys.modules
    index_file.write_text(json.dumps({**index, "scheduler": ["evil_module_xyz", "S"]}))
    with pytest.raises(ValueError, match="field 'scheduler'"):
        hub.load_pipeline_components(folder)
    index_file.write_text(json.dumps(index))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        hub.load_pipeline_components(folder)
    weights.unlink()
    torch.save(tiny_mlp().state_dict(), folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises((CheckpointError, FileNotFoundError, ValueError), match="safetensors"):
        hub.load_pipeline_components(folder)
    with pytest.raises(FileNotFoundError, match="expected a pipeline folder"):
        hub.load_pipeline_components(tmp_path / "nothing")


def test_model_card_metadata(tmp_path):
    from huggingface_hub import ModelCard
    from PIL import Image

    info = {
        "model_name": "digits-test",
        "license": "mit",
        "dataset_name": "digits",
        "dataset_description": "8x8 digits",
        "objective": "epsilon",
        "command": "score-toolkit train --config digits.yaml",
        "training_config_yaml": "train:\n  steps: 3\n",
        "results": [{"name": "sliced W2", "type": "sliced_wasserstein", "value": 0.5, "floor": 0.25,
                     "settings": {"num_samples": 8, "sampler": "ancestral"}, "command": "score-toolkit train --config digits.yaml"}],
        "final_loss": 1.25,
        "sample_image": Image.new("RGB", (16, 16), "white"),
        "sample_shape": [1, 8, 8],
    }
    folder = hub.export_pipeline(tiny_unet(), DiscreteVP(), "epsilon", "index", tmp_path / "out", info)
    assert (folder / "sample.png").is_file()
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["license"] == "mit"
    assert data["pipeline_tag"] == "unconditional-image-generation"
    assert "score-toolkit" in data["tags"] and "process:DiscreteVP" in data["tags"]
    assert "datasets" not in data  # the digits have no Hub dataset id: none is invented
    result = data["model-index"][0]["results"][0]
    assert result["metrics"] == [{"type": "sliced_wasserstein", "value": 0.5, "name": "sliced W2 (noise floor 0.25)",
                                  "args": {"num_samples": 8, "sampler": "ancestral",
                                           "command": "score-toolkit train --config digits.yaml"}}]
    assert result["task"]["type"] == "unconditional-image-generation"
    assert result["dataset"] == {"name": "8x8 digits", "type": "digits"}
    text = card.text
    for needle in ("score-toolkit train --config digits.yaml", "steps: 3", "DiscreteVP", "![samples](sample.png)",
                   "DDPMPipeline.from_pretrained", "load_pipeline_components",
                   "| sliced W2 (noise floor 0.25) | 0.5 | num_samples=8, sampler=ancestral | [1] |",
                   "1. `score-toolkit train --config digits.yaml`", "Final training loss (mean over the last log window): 1.25",
                   "no dataset id on the Hugging Face Hub", hub.RESULTS_BEGIN, hub.RESULTS_END):
        assert needle in text, needle
    # a third-party component: still a diffusers pipeline folder (the Hub knows the library); no Hub task for 2-D
    toy = hub.export_pipeline(tiny_mlp(), VPSDE(), "epsilon", "t", tmp_path / "toy",
                              {"dataset_name": "ring", "dataset_id": "someone/ring-points"})
    toy_card = ModelCard.load(toy / "README.md")
    toy_data = toy_card.data.to_dict()
    assert toy_data["library_name"] == "diffusers" and "pipeline_tag" not in toy_data
    assert toy_data["datasets"] == ["someone/ring-points"] and "model-index" not in toy_data
    assert "import score_toolkit" in toy_card.text and "No measurements were recorded." in toy_card.text
    # what is not a measurement of the model never reaches the model-index
    for bad in ({"name": "final training loss", "type": "training_loss", "value": 1.0},
                {"name": "noise floor: sliced W2", "type": "sliced_wasserstein_floor", "value": 0.1},
                {"name": "samples drawn", "type": "nfe", "value": 501}):
        with pytest.raises(ValueError, match="not a measurement of the model"):
            hub.export_pipeline(tiny_mlp(), VPSDE(), "epsilon", "t", tmp_path / "bad", {"results": [bad]})
    assert not (tmp_path / "bad").exists()


def test_train_exports_a_loadable_folder_with_a_card(tmp_path):
    from score_toolkit.training import train

    cfg = {
        "output_dir": str(tmp_path / "run"),
        "data": {"name": "digits"},
        "process": {"name": "DiscreteVP", "options": {"num_train_timesteps": 100}},
        "model": {"name": "UNet2DModel", "prediction_type": "epsilon", "time_input": "index",
                  "options": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
                              "down_block_types": ["DownBlock2D", "DownBlock2D"],
                              "up_block_types": ["UpBlock2D", "UpBlock2D"]}},
        "objective": {"name": "epsilon"},
        "train": {"steps": 3, "batch_size": 8, "checkpoint_every": 3, "progress": False, "log_every": 1},
        "export": {"num_samples": 8, "sampler_options": {"num_steps": 5, "denoise": True},
                   "command": "score-toolkit train --config x.yaml"},
    }
    result = train(cfg)
    folder = result.export_folder
    assert folder == tmp_path / "run" / "pipeline"
    _check_folder(folder)
    loaded = hub.load_pipeline_components(folder)
    assert same_weights(loaded.model, result.model)  # the EMA weights
    assert loaded.process == DiscreteVP(num_train_timesteps=100)
    text = (folder / "README.md").read_text()
    assert "score-toolkit train --config x.yaml" in text and "sliced W2" in text and (folder / "sample.png").is_file()
    from huggingface_hub import ModelCard

    measured = ModelCard.load(folder / "README.md").data.eval_results
    assert [r.metric_type for r in measured] == ["sliced_wasserstein", "energy_distance"]
    assert all(r.metric_args["command"] == "score-toolkit train --config x.yaml" and r.metric_args["nfe"] == 6
               and r.metric_args["num_samples"] == 8 for r in measured)
    pipe = DDPMPipeline.from_pretrained(str(folder))
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 1)


# ------------------------------------------------------------------------------------ the shipped models
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["toy2d", "digits"])
def test_shipped_model_was_trained_by_the_recorded_command_and_loads(name):
    """hub_cards/<name>: trained with `score-toolkit train --config hub_cards/configs/<name>.yaml` (the card
    says so and holds that config, resolved), small, loads strictly."""
    import yaml

    from score_toolkit.training import load_config

    folder = REPO / "hub_cards" / name
    config_file = REPO / "hub_cards" / "configs" / f"{name}.yaml"
    card = (folder / "README.md").read_text()
    command = f"score-toolkit train --config hub_cards/configs/{name}.yaml"
    assert f"Trained with exactly this command:\n\n```bash\n{command}\n```" in card
    block = card.split("Resolved training configuration:\n\n```yaml\n", 1)[1].split("```", 1)[0]
    expected = load_config(config_file).to_dict()
    expected["export"].pop("command")
    assert yaml.safe_load(block) == expected
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 4e6, f"{folder} holds {size / 1e6:.1f} MB"
    loaded = hub.load_pipeline_components(folder)
    assert loaded.prediction_type == "epsilon"


def test_shipped_toy_model_samples_the_ring():
    from score_toolkit.analytic import ring_mixture
    from score_toolkit.metrics import mode_weight_error, noise_floor, sliced_wasserstein
    from score_toolkit.registry import get_sampler
    from score_toolkit.scores import ScoreAdapter

    model, process, prediction_type, time_input = hub.load_pipeline_components(REPO / "hub_cards" / "toy2d")
    score_fn = ScoreAdapter(model, process, prediction_type, time_input)
    n = 2000
    with torch.no_grad():
        x = get_sampler("dpmpp_2m", num_steps=25).sample(score_fn, process, shape=(n, 2),
                                                         generator=torch.Generator().manual_seed(0)).samples
    ring = ring_mixture()
    g = torch.Generator().manual_seed(1)
    sw = sliced_wasserstein(x, ring.sample(n, generator=torch.Generator().manual_seed(3)), generator=g)
    floor = noise_floor(ring, n, lambda a, b: sliced_wasserstein(a, b, generator=torch.Generator().manual_seed(1)))
    assert sw < 3 * floor, (sw, floor)
    assert mode_weight_error(x, ring) < 0.05


def test_shipped_digits_model_draws_recognisable_digits():
    """The shipped classifier (held-out accuracy 0.98) is confident about the samples, and they cover every
    class. Real digits score a mean confidence of 0.993; uniform noise 0.78."""
    from score_toolkit._utils import per_sample_generators
    from score_toolkit.evaluation import evaluate_digits
    from score_toolkit.registry import get_sampler
    from score_toolkit.scores import ScoreAdapter

    model, process, prediction_type, time_input = hub.load_pipeline_components(REPO / "hub_cards" / "digits")
    score_fn = ScoreAdapter(model, process, prediction_type, time_input)
    n = 128
    with torch.no_grad():
        x = get_sampler("dpmpp_2m", num_steps=25).sample(score_fn, process, shape=(n, 1, 8, 8),
                                                         generator=per_sample_generators(0, range(n))).samples
    rep = evaluate_digits(x, nfe=25, wall_time_s=1.0)
    assert rep.metrics["mean_confidence"] > 0.9, rep.metrics
    assert min(rep.details["class_histogram"]) > 0, rep.details["class_histogram"]


def test_exported_folders_say_whether_ddpm_pipeline_can_run_them(tmp_path):
    """A vector network (or a scheduler without step()) loads in diffusers as a DDPMPipeline that cannot run:
    model_index.json and the card say how to sample it; the shipped toy2d folder too, and that way works."""
    from score_toolkit.hub import SAMPLING_NOTE
    from score_toolkit.pipeline import ScorePipeline, shipped_model_path

    torch.manual_seed(0)
    folder = hub.export_pipeline(ScoreMLP(2, hidden_dim=8, num_layers=1), VPSDE(), "epsilon", "t", tmp_path / "vec")
    for f in (folder, shipped_model_path("toy2d")):
        index = json.loads((f / "model_index.json").read_text())
        assert index["_sampling"] == SAMPLING_NOTE
        card = (f / "README.md").read_text()
        assert "calling it does not" in card and "ScorePipeline.from_pretrained(folder)(batch_size=16)" in card
        pipe = DiffusionPipeline.from_pretrained(f)
        assert type(pipe) is DDPMPipeline
        with pytest.raises(AttributeError, match="sample_size"):  # what the note warns about
            pipe(batch_size=1, num_inference_steps=2)
        sampler = ScorePipeline.from_pretrained(f)
        sampler.set_progress_bar_config(disable=True)
        assert sampler(batch_size=16).samples.shape == (16, 2)
    image = hub.export_pipeline(tiny_unet(), DiscreteVP(num_train_timesteps=100, beta_end=0.2), "epsilon", "index",
                            tmp_path / "img")
    assert "_sampling" not in json.loads((image / "model_index.json").read_text())
    assert "also loads and samples in plain diffusers" in (image / "README.md").read_text()
