"""Training at image scale: lazy image data through the loop, UNet presets, Accelerate's precision setting,
learning-rate schedules saved with the state, trackers, gradient checkpointing, and errors that name the field."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import small_config

from score_toolkit.data import ImageDataset
from score_toolkit.models.presets import PRESET_RECIPES, UNET_PRESETS, build_unet, count_parameters, unet_preset
from score_toolkit.training import ConfigError, build_components, load_config, train

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _folder(path, n=8, size=8, mode="RGB"):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode).save(path / f"{i}.png")
    return path


TINY_UNET = {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
             "down_block_types": ["SkipDownBlock2D", "SkipDownBlock2D"], "up_block_types": ["SkipUpBlock2D", "SkipUpBlock2D"]}


def image_config(out, folder, **sections):
    cfg = small_config(
        out,
        data={"name": "image_folder", "options": {"path": str(folder), "image_size": 8, "random_flip": True}},
        process={"name": "VESDE", "options": {"sigma_min": 0.01, "sigma_max": 10.0}},
        model={"name": "UNet2DModel", "preset": "ncsnpp_32_small", "prediction_type": "score", "time_input": "sigma",
               "options": TINY_UNET},
        train={"steps": 4, "batch_size": 4, "checkpoint_every": 2, "log_every": 1, "progress": False},
    )
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


# ------------------------------------------------------------------------------------------ presets
def test_ddpm_cifar10_preset_has_the_published_size():
    # google/ddpm-cifar10-32: 35.7M parameters
    assert count_parameters(build_unet("ddpm_cifar10")) == 35_746_307


@pytest.mark.parametrize("name", sorted(UNET_PRESETS))
def test_presets_build_and_run(name):
    model = build_unet(name, sample_size=32)
    x = torch.randn(1, 3, 32, 32)
    t = torch.tensor([0.5 if PRESET_RECIPES[name]["time_input"] == "sigma" else 10.0])
    assert model(x, t).sample.shape == x.shape
    if "small" in name:
        assert count_parameters(model) < 3_000_000
    if name.startswith("ncsnpp"):
        assert model.config.time_embedding_type == "fourier"
        assert all("Skip" in b for b in model.config.down_block_types + model.config.up_block_types)


def test_preset_errors():
    with pytest.raises(ValueError, match="did you mean|Did you mean 'ddpm_cifar10'"):
        unet_preset("ddpm_cifar")
    with pytest.raises(ConfigError, match="set model.name: UNet2DModel"):
        build_components(small_config("unused", model={"name": "ScoreMLP", "preset": "ddpm_cifar10"}))


@pytest.mark.parametrize("name", sorted(UNET_PRESETS))
def test_shipped_preset_configs_name_their_preset_and_recipe(name, tmp_path):
    from pathlib import Path

    path = Path(__file__).parent.parent / "hub_cards" / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    recipe = PRESET_RECIPES[name]
    assert cfg.model.preset == name and cfg.model.name == "UNet2DModel"
    assert cfg.model.prediction_type == recipe["prediction_type"] and cfg.model.time_input == recipe["time_input"]
    assert cfg.process.name == recipe["process"]["name"] and cfg.process.options == recipe["process"]["options"]
    assert cfg.objective.name == recipe["objective"]["name"]
    assert cfg.data.name == "hf"
    # the config builds on local images standing in for its data set
    folder = _folder(tmp_path / "imgs", n=2, size=32)
    overrides = [f"data.options={{path: imagefolder, data_dir: {folder}, image_size: 32, cache_dir: {tmp_path / 'c'}}}",
                 f"output_dir={tmp_path / 'run'}"]
    comps = build_components(load_config(path, overrides))
    assert comps.model.config.block_out_channels == tuple(UNET_PRESETS[name]["block_out_channels"]) or \
        list(comps.model.config.block_out_channels) == UNET_PRESETS[name]["block_out_channels"]


# ------------------------------------------------------------------------------------------ image data in the loop
def test_trains_on_an_image_folder_without_loading_it_whole(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "imgs")

    def no_whole_set(self):
        raise AssertionError("the training read the whole image set")

    monkeypatch.setattr(ImageDataset, "data", property(no_whole_set))
    cfg = image_config(tmp_path / "run", folder, data={"name": "image_folder",
                                                       "options": {"path": str(folder), "image_size": 8,
                                                                   "num_workers": 1}},
                       export={"enabled": True, "num_samples": 4, "sampler": "euler_maruyama",
                               "sampler_options": {"num_steps": 5}})
    result = train(cfg)
    assert result.step == 4 and (result.export_folder / "model_index.json").is_file()
    assert all(np.isfinite(h["loss"]) for h in result.history)
    # the same run again resumes to the same weights: the data order is a function of (seed, step)
    again = train(image_config(tmp_path / "run2", folder, train={"steps": 2}, data=cfg["data"]))
    resumed = train(image_config(tmp_path / "run2", folder, data=cfg["data"]), resume=True)
    for p, q in zip(train(image_config(tmp_path / "run3", folder, data=cfg["data"])).model.parameters(),
                    resumed.model.parameters()):
        assert torch.equal(p, q)
    assert again.step == 2


def test_rgb_images_for_a_one_channel_network_name_the_fields(tmp_path):
    folder = _folder(tmp_path / "imgs")
    cfg = image_config(tmp_path / "run", folder, model={"options": {**TINY_UNET, "in_channels": 1, "out_channels": 1}})
    with pytest.raises(ConfigError, match=r"in_channels = 1 .*RGB \(3-channel\) images for a 1-channel network.*"
                                          r"data option channels: 1"):
        build_components(cfg)
    cfg["data"]["options"]["channels"] = 1
    # diffusers' skip blocks (NCSN++) are RGB-only: a clear error, and a plain UNet takes grey images
    with pytest.raises(ConfigError, match="skip blocks .* 3-channel images only"):
        build_components(cfg)
    cfg["model"] = {"name": "UNet2DModel", "preset": "ddpm_cifar10_small", "options": {
        "block_out_channels": [16, 32], "norm_num_groups": 8, "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"]}}
    cfg["process"] = {"name": "VPSDE"}
    assert build_components(cfg).dataset.sample_shape == (1, 8, 8)


# ------------------------------------------------------------------------------------------ precision
def test_accelerate_precision_setting_is_honoured_unless_the_config_sets_one(tmp_path, monkeypatch):
    seen = []

    def record(info):
        seen.append((info["accelerator"].mixed_precision,))

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what accelerate launch --mixed_precision bf16 sets
    result = train(small_config(tmp_path / "a", train={"steps": 2}), callbacks=[record])
    assert seen[-1][0] == "bf16" and result.config.train.mixed_precision == "bf16"
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["mixed_precision"] == "bf16"
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    result = train(small_config(tmp_path / "b", train={"steps": 2, "mixed_precision": "no"}), callbacks=[record])
    assert seen[-1][0] == "no" and result.config.train.mixed_precision == "no"


def test_bf16_autocast_reaches_the_network(tmp_path):
    dtypes = []
    cfg = small_config(tmp_path / "run", train={"steps": 1, "mixed_precision": "bf16"})
    from score_toolkit.models import ScoreMLP

    original = ScoreMLP.forward

    def forward(self, x, t, *args, **kwargs):
        out = original(self, x, t, *args, **kwargs)
        dtypes.append(out.dtype if hasattr(out, "dtype") else out.sample.dtype)
        return out

    ScoreMLP.forward = forward
    try:
        train(cfg)
    finally:
        ScoreMLP.forward = original
    assert torch.bfloat16 in dtypes


def test_a_second_precision_in_one_process_is_a_clear_error(tmp_path):
    train(small_config(tmp_path / "a", train={"steps": 1, "mixed_precision": "bf16"}))
    with pytest.raises(ConfigError, match="already used Accelerate with another device or mixed precision"):
        train(small_config(tmp_path / "b", train={"steps": 1, "mixed_precision": "no"}))


# ------------------------------------------------------------------------------------------ schedules, trackers
def test_lr_schedule_follows_diffusers_and_is_restored_on_resume(tmp_path):
    from diffusers.optimization import get_scheduler

    train_cfg = {"steps": 12, "warmup_steps": 3, "lr_scheduler": "cosine", "log_every": 1, "checkpoint_every": 5,
                 "learning_rate": 1e-2}
    full = train(small_config(tmp_path / "full", train=train_cfg))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    ref = get_scheduler("cosine", opt, num_warmup_steps=3, num_training_steps=12)
    want = []
    for _ in range(13):
        want.append(ref.get_last_lr()[0])
        opt.step()
        ref.step()
    # step k trains with the schedule's value at k
    assert [h["lr"] for h in full.history] == pytest.approx(want[1:13], rel=1e-12, abs=1e-15)
    state = json.loads((tmp_path / "full" / "checkpoints" / "step_0000010" / "trainer_state.json").read_text())
    assert state["lr_scheduler"]["last_epoch"] == 11
    def crash(info):
        if info["step"] == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(small_config(tmp_path / "part", train=train_cfg), callbacks=[crash])
    resumed = train(small_config(tmp_path / "part", train=train_cfg), resume=True)
    assert [h["lr"] for h in resumed.history] == pytest.approx([h["lr"] for h in full.history][5:], rel=1e-12)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_schedule_and_tracker_errors(tmp_path):
    cases = [
        ({"lr_scheduler": "cosin"}, r"train.lr_scheduler.*did you mean 'cosine'"),
        ({"lr_scheduler": "cosine", "lr_scheduler_options": {"cycles": 2}}, r"unknown option\(s\) \['cycles'\]"),
        ({"lr_scheduler": "piecewise_constant"}, "step_rules"),
        ({"log_with": "tensorbord"}, r"train.log_with.*did you mean 'tensorboard'"),
        ({"log_with": ["wandb", 3]}, r"train.log_with"),
    ]
    for train_cfg, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            train(small_config(tmp_path / "run", train=train_cfg))


def test_any_installed_accelerate_tracker(tmp_path):
    from accelerate import utils

    installed = [name for name in ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive")
                 if getattr(utils, f"is_{name}_available")()]
    missing = [name for name in ("wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive") if name not in installed]
    if missing:
        with pytest.raises(ConfigError, match=f"needs the {missing[0]} package"):
            train(small_config(tmp_path / "m", train={"log_with": [missing[0]]}))
    if "tensorboard" in installed:
        result = train(small_config(tmp_path / "t", train={"steps": 2, "log_every": 1, "log_with": ["tensorboard"]}))
        assert any((tmp_path / "t" / "logs").rglob("events.out.tfevents*")) and result.step == 2


# ------------------------------------------------------------------------------------------ memory options
def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    folder = _folder(tmp_path / "imgs")
    a = train(image_config(tmp_path / "a", folder, train={"steps": 2}))
    b = train(image_config(tmp_path / "b", folder, train={"steps": 2, "gradient_checkpointing": True}))
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], rel=1e-5)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    with pytest.raises(ConfigError, match="gradient_checkpointing: the network ScoreMLP does not support it"):
        train(small_config(tmp_path / "c", train={"gradient_checkpointing": True}))


def test_trains_on_a_streamed_parquet_set(tmp_path, monkeypatch):
    hf = pytest.importorskip("datasets")
    monkeypatch.setattr(hf.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)  # 5 s after each pass over a parquet shard
    rng = np.random.default_rng(0)
    rows = {"image": [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(12)]}
    hf.Dataset.from_dict(rows, features=hf.Features({"image": hf.Image()})).to_parquet(str(tmp_path / "d.parquet"))
    data = {"name": "hf", "options": {"path": str(tmp_path / "d.parquet"), "streaming": True, "shuffle_buffer": 4,
                                      "cache_dir": str(tmp_path / "c")}}
    cfg = image_config(tmp_path / "run", tmp_path, data=data,
                       export={"enabled": True, "num_samples": 4, "sampler": "euler_maruyama",
                               "sampler_options": {"num_steps": 3}})
    result = train(cfg)  # 4 steps of 4: crosses an epoch of the 12-image stream
    assert result.step == 4 and all(np.isfinite(h["loss"]) for h in result.history)
    assert (result.export_folder / "README.md").is_file()


# ------------------------------------------------------------------------------------------ class labels
def _record_class_labels(seen):
    """A training callback that, from the first step on, records the class_labels every network call gets."""
    def hook(module, args, kwargs):
        seen.append(kwargs.get("class_labels"))

    def callback(info):
        if not getattr(info["model"], "_label_hook", False):
            info["model"].register_forward_pre_hook(hook, with_kwargs=True)
            info["model"]._label_hook = True

    return callback


def test_class_conditional_training_from_image_folder_sub_folders(tmp_path):
    from score_toolkit.data import load_dataset, training_batches

    for k, name in enumerate(["cat", "dog", "emu"]):
        _folder(tmp_path / "imgs" / name, n=4 + k)
    data = {"name": "image_folder", "options": {"path": str(tmp_path / "imgs"), "image_size": 8, "labels": True}}
    source = load_dataset(data["name"], **data["options"])
    assert source.num_classes == 3 and source.options["class_names"] == ["cat", "dog", "emu"]
    assert source.examples(range(len(source)))[1].tolist() == [0] * 4 + [1] * 5 + [2] * 6
    seen = []
    cfg = image_config(tmp_path / "run", tmp_path / "imgs", data=data,
                       model={"options": {**TINY_UNET, "num_class_embeds": 4}},
                       train={"steps": 3, "label_dropout": 0.0})
    result = train(cfg, callbacks=[_record_class_labels(seen)])
    assert result.step == 3 and all(np.isfinite(h["loss"]) for h in result.history)
    expected = [y for _, y in training_batches(source, seed=cfg["seed"], batch_size=4, start_step=1, stop_step=3)]
    assert len(seen) == 2 and all(torch.equal(s.cpu(), e) for s, e in zip(seen, expected))
    with pytest.raises(ValueError, match="has no labels.*labels: true"):
        train(image_config(tmp_path / "run2", tmp_path / "imgs", model={"options": {**TINY_UNET, "num_class_embeds": 4}},
                           data={"options": {"path": str(tmp_path / "imgs"), "image_size": 8}}))
    with pytest.raises(ValueError, match="3 classes.*sub-folder.*3 rows.*num_class_embeds to 4"):
        train(image_config(tmp_path / "run3", tmp_path / "imgs", data=data,
                           model={"options": {**TINY_UNET, "num_class_embeds": 3}}))
    _folder(tmp_path / "imgs", n=1)  # an image beside the class folders
    with pytest.raises(ValueError, match=r"0\.png is not in a sub-folder"):
        load_dataset(data["name"], **data["options"])


def test_class_conditional_training_from_a_datasets_label_column(tmp_path, monkeypatch):
    hf = pytest.importorskip("datasets")
    monkeypatch.setattr(hf.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    from score_toolkit.data import load_dataset, training_batches

    rng = np.random.default_rng(0)

    def parquet(name, labels):
        rows = {"image": [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in labels],
                "species": labels}
        feats = hf.Features({"image": hf.Image(), "species": hf.Value("int64")})
        hf.Dataset.from_dict(rows, features=feats).to_parquet(str(tmp_path / name))
        return {"name": "hf", "options": {"path": str(tmp_path / name), "label_column": "species",
                                          "cache_dir": str(tmp_path / "c")}}

    data = parquet("ok.parquet", [0, 1, 2, 1, 0, 2, 2, 1])
    seen = []
    cfg = image_config(tmp_path / "run", tmp_path, data=data, model={"options": {**TINY_UNET, "num_class_embeds": 4}},
                       train={"steps": 3, "label_dropout": 0.0})
    result = train(cfg, callbacks=[_record_class_labels(seen)])
    assert result.step == 3 and all(np.isfinite(h["loss"]) for h in result.history)
    source = load_dataset(data["name"], **data["options"])
    expected = [y for _, y in training_batches(source, seed=cfg["seed"], batch_size=4, start_step=1, stop_step=3)]
    assert len(seen) == 2 and all(torch.equal(s.cpu(), e) for s, e in zip(seen, expected))
    # a label beyond the network's classes: named with its column, before any step is taken on it
    bad = parquet("bad.parquet", [0, 1, 7, 1, 0, 2, 2, 1])
    with pytest.raises(ValueError, match=r"label\(s\) \[7\] \(label column 'species'\).*classes 0\.\.2"):
        train(image_config(tmp_path / "run2", tmp_path, data=bad, model={"options": {**TINY_UNET, "num_class_embeds": 4}},
                           train={"steps": 3}))
    # with num_classes the data layer names the row too
    bad["options"]["num_classes"] = 3
    with pytest.raises(ValueError, match=r"row 2.*label 7 in column 'species' is out of range: expected 0 \.\. 2"):
        load_dataset(bad["name"], **bad["options"]).examples([2])


# ------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_compiled_unet_trains_like_the_eager_one_on_cpu(tmp_path, monkeypatch):
    # inductor on CPU compiles C++ (gcc) for the forward and backward graphs: minutes, so a tiny network and two
    # steps; the same process ran an eager Accelerate run first, so this also checks that compile is not lost
    folder = _folder(tmp_path / "imgs")
    eager = train(image_config(tmp_path / "a", folder, train={"steps": 2, "checkpoint_every": 10}))
    compiled_models, compile_fn = [], torch.compile

    def spy(model, *args, **kwargs):
        out = compile_fn(model, *args, **kwargs)
        compiled_models.append(out)
        return out

    monkeypatch.setattr(torch, "compile", spy)
    compiled = train(image_config(tmp_path / "b", folder, train={"steps": 2, "checkpoint_every": 10, "compile": True}))
    assert len(compiled_models) == 1 and isinstance(compiled_models[0], torch._dynamo.eval_frame.OptimizedModule)
    # inductor's fused kernels round differently: the same losses to 1e-3, not bit for bit
    assert [h["loss"] for h in compiled.history] == pytest.approx([h["loss"] for h in eager.history], rel=1e-3)


def test_compile_without_a_cpp_compiler_is_a_clear_error(tmp_path, monkeypatch):
    cpp_builder = pytest.importorskip("torch._inductor.cpp_builder")

    def no_compiler():
        raise RuntimeError("no working C++ compiler found in ('g++',)")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(ConfigError, match="train.compile: torch.compile .inductor. needs a C\\+\\+ compiler on CPU.*g\\+\\+"):
        train(image_config(tmp_path / "run", _folder(tmp_path / "imgs"), train={"compile": True, "cpu": True}))
