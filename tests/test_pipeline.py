"""ScorePipeline: exact Gaussian moments end to end (network time input -> score -> sampler), the call's
arguments and outputs, batch independence, save/load round trips (local folders and the Hub cache), and
clear errors for bad folders and bad arguments."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, DDPMPipeline, DDPMScheduler, ModelMixin, ScoreSdeVeScheduler, UNet2DModel
from diffusers.configuration_utils import register_to_config
from helpers import recording_bars, vector_pipeline
from PIL import Image

from score_toolkit._utils import per_sample_generators
from score_toolkit.analytic import gaussian
from score_toolkit.hub import export_pipeline
from score_toolkit.models import CheckpointError, EnergyMLP
from score_toolkit.pipeline import SHIPPED_MODELS_ENV_VAR, ScorePipeline, ScorePipelineOutput, shipped_model_path
from score_toolkit.processes import VESDE, VPSDE, DiscreteVP
from score_toolkit.registry import get_sampler
from score_toolkit.samplers.base import Sampler, SamplerProperties
from score_toolkit.schedulers import scheduler_for
from score_toolkit.scores import ScoreAdapter, score_to_prediction


class AnalyticNet(ModelMixin, ConfigMixin):
    """A perfect network for Gaussian data: outputs the exact prediction at its time input."""

    @register_to_config
    def __init__(self, dim: int = 2):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def bind(self, mixture, process, prediction_type, time_input):
        self.mixture, self.process, self.prediction_type = mixture, process, prediction_type
        self.time_map = ScoreAdapter(lambda x, t: None, process, prediction_type, time_input, check_inputs=False)
        return self

    def forward(self, x, time):
        assert isinstance(time, torch.Tensor) and time.is_floating_point() and time.shape == (x.shape[0],)
        t = self._t(time.double())
        alpha, sigma = self.process.marginal(t)
        s = self.mixture.score(x.double(), t, self.process)
        return score_to_prediction(s, x.double(), alpha, sigma, self.prediction_type).to(x.dtype)

    def _t(self, values):
        ti = self.time_map.time_input
        if ti == "t":
            return values
        if ti == "index":
            a, b = self.time_map.network_time(torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist()
            return (values - a) / (b - a)
        assert isinstance(self.process, VESDE)  # sigma input: VE, where sigma is the noise-to-signal ratio
        return self.process.t_from_noise_to_signal(values)


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


def image_pipeline():
    return ScorePipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100, beta_end=0.2))


GENS = lambda n, seed=0: [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]  # noqa: E731


# ------------------------------------------------------------------------------------ exact end to end
@pytest.mark.parametrize(
    "label, scheduler, prediction_type, time_input",
    [
        ("ddpm table, v-prediction, index input", DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction"),
         "v_prediction", "index"),
        ("VE, score, sigma input", ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=20.0), "score", "sigma"),
        ("VP SDE, epsilon, t input", scheduler_for(VPSDE(), "epsilon", "t"), "epsilon", "t"),
    ],
)
def test_exact_network_gives_the_exact_score_and_the_data_moments(label, scheduler, prediction_type, time_input):
    """A perfect network of Gaussian data N(mean, diag(var)) behind each kind of scheduler config. The pipeline
    (network time input -> prediction -> score -> sampler) gives the samples of the sampler run on the exact
    score from the same noise, and these have the data's mean and variance."""
    mean, var = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.3, 0.1], dtype=torch.float64)
    pipe = ScorePipeline(unet=AnalyticNet(dim=2), scheduler=scheduler)
    process, pred, ti = pipe.spec
    assert (pred, ti) == (prediction_type, time_input)
    data = gaussian(mean, var)
    pipe.unet.bind(data, process, pred, ti)
    n = 4000
    out = pipe(batch_size=n, sampler="dpmpp_2m", num_steps=100, generator=torch.Generator().manual_seed(0))
    assert out.nfe == 101 and out.images is None  # dpmpp_2m ends with to_zero by default: one more evaluation
    exact = get_sampler("dpmpp_2m", num_steps=100).sample(data.score_fn(process), process, shape=(n, 2),
                                                          generator=torch.Generator().manual_seed(0)).samples
    assert (out.samples - exact).abs().max() < 1e-4, label
    x = out.samples.double()
    assert ((x.mean(0) - mean).abs() < 4 * (var / n).sqrt() + 2e-3).all(), (label, x.mean(0))
    assert ((x.var(0) / var - 1).abs() < 4 * (2 / n) ** 0.5 + 0.01).all(), (label, x.var(0))


# ------------------------------------------------------------------------------------ call arguments and outputs
def test_outputs_for_images():
    pipe = image_pipeline()
    pil = pipe(batch_size=3, sampler="ancestral", num_inference_steps=3, generator=GENS(3))
    assert isinstance(pil, ScorePipelineOutput) and pil.nfe == 3
    assert len(pil.images) == 3 and all(isinstance(im, Image.Image) and im.size == (8, 8) for im in pil.images)
    arr = pipe(batch_size=3, sampler="ancestral", num_inference_steps=3, generator=GENS(3), output_type="np")
    ten = pipe(batch_size=3, sampler="ancestral", num_inference_steps=3, generator=GENS(3), output_type="pt")
    assert isinstance(arr.images, np.ndarray) and arr.images.shape == (3, 8, 8, 1) and isinstance(arr.samples, np.ndarray)
    assert torch.equal(ten.images, ((ten.samples + 1) / 2).clamp(0, 1))
    assert np.array_equal(arr.images, ten.images.permute(0, 2, 3, 1).numpy())
    assert np.array_equal(np.asarray(pil.images[0]), (arr.images[0, :, :, 0] * 255).round().astype(np.uint8))
    images, nfe = pipe(batch_size=3, sampler="ancestral", num_inference_steps=3, generator=GENS(3),
                       output_type="pt", return_dict=False)
    assert torch.equal(images, ten.images) and nfe == 3


def test_outputs_for_vectors_and_shape():
    pipe = vector_pipeline()
    assert pipe.sample_shape == (2,)
    out = pipe(batch_size=5, sampler="euler_maruyama", num_steps=4, generator=torch.Generator().manual_seed(0))
    assert out.samples.shape == (5, 2) and out.images is None and out.nfe == 4
    assert pipe(shape=(4, 2), sampler="ancestral", num_steps=2).samples.shape == (4, 2)
    with pytest.raises(ValueError, match="output_type='pil' needs image-shaped"):
        pipe(batch_size=2, sampler="ancestral", num_steps=2, output_type="pil")
    with pytest.raises(ValueError, match="output_type"):
        pipe(batch_size=2, sampler="ancestral", num_steps=2, output_type="latent")
    with pytest.raises(ValueError, match="disagrees"):
        pipe(batch_size=3, shape=(4, 2), sampler="ancestral", num_steps=2)
    with pytest.raises(ValueError, match="positive int"):
        pipe(batch_size=0, sampler="ancestral", num_steps=2)


def test_sampler_options_and_their_errors():
    pipe = vector_pipeline()
    steps = []
    out = pipe(batch_size=2, sampler="ancestral", sampler_options={"num_steps": 4}, variance="forward",
               callback=lambda info: steps.append(info["step"]))
    assert steps == [1, 2, 3, 4] and out.nfe == 4
    with pytest.raises(ValueError, match="both"):
        pipe(batch_size=2, sampler="ancestral", sampler_options={"num_steps": 4}, num_steps=5)
    with pytest.raises(ValueError, match="not both"):
        pipe(batch_size=2, sampler="ancestral", num_inference_steps=4, num_steps=5)
    with pytest.raises(ValueError, match="(?i)did you mean 'ancestral'"):
        pipe(batch_size=2, sampler="ancestrel")
    with pytest.raises(TypeError, match="num_step.*did you mean 'num_steps'.*ScorePipeline's own arguments"):
        pipe(batch_size=2, sampler="ancestral", num_step=4)
    with pytest.raises(TypeError, match="has no num_steps option"):
        pipe(batch_size=2, sampler="annealed_langevin", num_inference_steps=4)
    with pytest.raises(TypeError, match="registered name or a Sampler"):
        pipe(batch_size=2, sampler=3)


def test_a_sampler_that_needs_energy_is_refused_for_other_networks_and_runs_on_energy_networks():
    class NeedsEnergy(Sampler):
        name = "needs_energy_test"
        properties = SamplerProperties(stochastic=True, order=None, needs_energy=True)

        def _run(self, ctx, x):
            return x + 0 * ctx.score(x, 0.5)

    with pytest.raises(ValueError, match="needs an energy network"):
        vector_pipeline()(batch_size=2, sampler=NeedsEnergy())
    torch.manual_seed(0)
    energy = ScorePipeline(unet=EnergyMLP(2, hidden_dim=16, num_layers=1).eval(),
                           scheduler=scheduler_for(VPSDE(), "energy", "t"))
    assert energy(batch_size=2, sampler=NeedsEnergy()).samples.shape == (2, 2)
    out = energy(batch_size=3, sampler="langevin", num_steps=3, t=0.5, metropolis=True, generator=GENS(3))
    assert bool(torch.isfinite(out.samples).all())


def test_network_batch_size_makes_samples_independent_of_the_batch():
    """With one generator per sample and a fixed network batch, sample i is bit-for-bit the same whether drawn
    alone or among others (UNet kernels round differently for other batch sizes, hence the fixed size)."""
    pipe = image_pipeline()
    kw = dict(sampler="euler_maruyama", num_steps=3, output_type="pt", network_batch_size=4)
    full = pipe(batch_size=6, generator=per_sample_generators(0, range(6)), **kw).samples
    parts = [pipe(batch_size=len(idx), generator=per_sample_generators(0, idx), **kw).samples
             for idx in (range(0, 1), range(1, 4), range(4, 6))]
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(ValueError, match="network_batch_size"):
        pipe(batch_size=2, network_batch_size=0, **{k: v for k, v in kw.items() if k != "network_batch_size"})


# ------------------------------------------------------------------------------------ save and load
def test_save_and_load_round_trip(tmp_path):
    pipe = vector_pipeline()
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == "ScorePipeline"
    assert index["unet"] == ["score_toolkit.models.mlp", "ScoreMLP"]
    again = ScorePipeline.from_pretrained(tmp_path / "p")
    assert not again.unet.training and again.spec == pipe.spec
    a = pipe(batch_size=4, sampler="ancestral", num_steps=5, generator=torch.Generator().manual_seed(3)).samples
    b = again(batch_size=4, sampler="ancestral", num_steps=5, generator=torch.Generator().manual_seed(3)).samples
    assert torch.equal(a, b)


def test_loads_exported_folders_and_diffusers_folders(tmp_path):
    export_pipeline(tiny_unet(), DiscreteVP(num_train_timesteps=100, beta_end=0.2), "epsilon", "index", tmp_path / "e")
    exported = ScorePipeline.from_pretrained(tmp_path / "e")
    assert json.loads((tmp_path / "e" / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert exported.spec[1:] == ("epsilon", "index")
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "d")
    plain = ScorePipeline.from_pretrained(tmp_path / "d")
    assert isinstance(plain.spec[0], DiscreteVP)
    exported.save_pretrained(tmp_path / "resaved")
    assert ScorePipeline.from_pretrained(tmp_path / "resaved").spec == exported.spec


def _fake_hub_cache(cache, repo_id, folder):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def test_loads_from_the_hub_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vector_pipeline().save_pretrained(tmp_path / "p")
    _fake_hub_cache(tmp_path / "cache", "someone/tiny-score", tmp_path / "p")
    pipe = ScorePipeline.from_pretrained("someone/tiny-score", cache_dir=tmp_path / "cache")
    assert pipe.spec == vector_pipeline().spec
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        ScorePipeline.from_pretrained("someone/not-cached", cache_dir=tmp_path / "cache")


def test_a_hub_download_fetches_what_loading_reads_and_no_pickle(tmp_path, monkeypatch):
    import fnmatch

    import huggingface_hub

    vector_pipeline().save_pretrained(tmp_path / "p")
    asked = {}

    def snapshot_download(repo_id, **kwargs):  # stands for the Hub: the patterns asked for, the files it would send
        asked.update(kwargs)
        return str(tmp_path / "p")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    ScorePipeline.from_pretrained("someone/tiny-score")
    wanted = lambda name: any(fnmatch.fnmatch(name, pat) for pat in asked["allow_patterns"])  # noqa: E731
    saved = [f.relative_to(tmp_path / "p").as_posix() for f in (tmp_path / "p").rglob("*") if f.is_file()]
    assert saved and all(wanted(name) for name in saved), saved
    for pickle in ("unet/diffusion_pytorch_model.bin", "unet/model.ckpt", "scheduler/extra.pkl", "unet/pipe.py"):
        assert not wanted(pickle), pickle


# ------------------------------------------------------------------------------------ bad folders
def _saved(tmp_path):
    folder = tmp_path / "p"
    image_pipeline().save_pretrained(folder)
    return folder


def test_a_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a pipeline folder: expected model_index.json"):
        ScorePipeline.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="expected a pipeline folder"):
        ScorePipeline.from_pretrained(tmp_path / "nothing" / "here")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="file.txt"):
        ScorePipeline.from_pretrained(tmp_path / "file.txt")


@pytest.mark.parametrize(
    "breakage, error, match",
    [
        ("index_json", ValueError, "corrupt model_index.json"),
        ("index_extra_component", ValueError, "also has \\['vqvae'\\]"),
        ("index_foreign_model", CheckpointError, "evil_pkg|_class_name"),
        ("index_foreign_scheduler", ValueError, "field 'scheduler'.*evil_pkg"),
        ("scheduler_unmappable", ValueError, "scheduler_config.json.*(beta_schedule|prediction_type)"),
        ("scheduler_json", ValueError, "corrupt the scheduler config .*scheduler_config.json"),
        ("weights_missing", FileNotFoundError, "diffusion_pytorch_model.safetensors"),
        ("weights_corrupt", CheckpointError, "diffusion_pytorch_model.safetensors"),
        ("weights_wrong_shape", CheckpointError, "mis-shaped"),
    ],
)
def test_bad_folders_give_clear_errors(tmp_path, breakage, error, match):
    folder = _saved(tmp_path)
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    sched_file = folder / "scheduler" / "scheduler_config.json"
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if breakage == "index_json":
        index_file.write_text("{not json")
    elif breakage == "index_extra_component":
        index_file.write_text(json.dumps({**index, "vqvae": ["diffusers", "VQModel"]}))
    elif breakage == "index_foreign_model":
        cfg = json.loads((folder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "_class_name": "Evil"}))
        index_file.write_text(json.dumps({**index, "unet": ["evil_pkg", "Evil"]}))
    elif breakage == "index_foreign_scheduler":
        index_file.write_text(json.dumps({**index, "scheduler": ["evil_pkg", "EvilScheduler"]}))
    elif breakage == "scheduler_unmappable":
        cfg = json.loads(sched_file.read_text())
        sched_file.write_text(json.dumps({**cfg, "beta_schedule": "sigmoid"}))
    elif breakage == "scheduler_json":
        sched_file.write_text("{")
    elif breakage == "weights_missing":
        weights.unlink()
    elif breakage == "weights_corrupt":
        weights.write_bytes(weights.read_bytes()[:100])
    elif breakage == "weights_wrong_shape":
        from safetensors.torch import load_file, save_file

        state = load_file(weights)
        key = next(k for k in state if k.endswith("conv_in.weight"))
        state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
        save_file(state, weights)
    with pytest.raises(error, match=match):
        ScorePipeline.from_pretrained(folder)


def test_constructor_checks_its_components():
    with pytest.raises(TypeError, match="ModelMixin"):
        ScorePipeline(unet=torch.nn.Linear(2, 2), scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match="beta_schedule"):
        ScorePipeline(unet=tiny_unet(), scheduler=DDPMScheduler(beta_schedule="sigmoid"))


# ------------------------------------------------------------------------------------ the shipped models
def test_shipped_model_path(tmp_path, monkeypatch):
    monkeypatch.setenv(SHIPPED_MODELS_ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"shipped 'digits' model is not at {tmp_path / 'digits'}.*train"):
        shipped_model_path("digits")
    image_pipeline().save_pretrained(tmp_path / "digits")
    assert shipped_model_path("digits") == tmp_path / "digits"
    monkeypatch.delenv(SHIPPED_MODELS_ENV_VAR)
    repo_default = shipped_model_path.__globals__["Path"](shipped_model_path.__code__.co_filename).resolve().parent.parent
    if (repo_default / "hub_cards" / "digits" / "model_index.json").is_file():
        assert shipped_model_path("digits") == repo_default / "hub_cards" / "digits"


def test_from_pretrained_finds_shipped_models_by_name_as_the_commands_do(tmp_path, monkeypatch):
    from score_toolkit.cli._common import resolve_model

    monkeypatch.setenv(SHIPPED_MODELS_ENV_VAR, str(tmp_path / "shipped"))
    vector_pipeline().save_pretrained(tmp_path / "shipped" / "tiny")
    image_pipeline().save_pretrained(tmp_path / "shipped" / "other")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for name in ("tiny", "hub_cards/tiny"):  # from any directory, as score-toolkit sample finds it
        assert ScorePipeline.from_pretrained(name).sample_shape == (2,)
        assert resolve_model(name) == str(tmp_path / "shipped" / "tiny")
    image_pipeline().save_pretrained(tmp_path / "elsewhere" / "tiny")  # a folder of the user's own of that name wins
    assert ScorePipeline.from_pretrained("tiny").sample_shape == (1, 8, 8) and resolve_model("tiny") == "tiny"
    # nothing of that name, and not a Hub id either: the error lists the shipped models
    with pytest.raises(FileNotFoundError, match=r"expected a pipeline folder, the name of a shipped model or a Hub "
                       r"repository id, found 'no such name': .*the shipped models in .*shipped: other, tiny\), and not "
                       r"a valid Hub repository id"):
        ScorePipeline.from_pretrained("no such name")
    # a Hub id that is not in the cache (offline): the error lists them too, with the closest one
    with pytest.raises(FileNotFoundError, match=r"at 'tinny': .*shipped: other, tiny; did you mean 'tiny'\?\), and "
                       r"the Hub repository could not be loaded"):
        ScorePipeline.from_pretrained("tinny", local_files_only=True, cache_dir=tmp_path / "cache")
    # a path written out is never swapped for the shipped model: only "tiny" and "hub_cards/tiny" name it
    (tmp_path / "third").mkdir()
    monkeypatch.chdir(tmp_path / "third")
    for path in ("./tiny", "/nonexistent/hub_cards/tiny", "../hub_cards/tiny", "x/hub_cards/tiny", "someuser/tiny"):
        with pytest.raises(FileNotFoundError) as err:
            ScorePipeline.from_pretrained(path, local_files_only=True, cache_dir=tmp_path / "cache")
        assert "did you mean" not in str(err.value), path  # no suggestion for a path or a Hub id
        assert resolve_model(path) == path


def test_from_pretrained_refuses_an_empty_name_and_warns_of_a_revision_it_cannot_apply(tmp_path, monkeypatch):
    from score_toolkit.hub import load_pipeline_components

    monkeypatch.setenv(SHIPPED_MODELS_ENV_VAR, str(tmp_path / "shipped"))
    vector_pipeline().save_pretrained(tmp_path / "shipped" / "tiny")
    vector_pipeline().save_pretrained(tmp_path / "here")
    monkeypatch.chdir(tmp_path / "here")  # the current directory is itself a pipeline folder: "" must not load it
    for name in ("", "  "):
        with pytest.raises(ValueError, match=r"expected a pipeline folder, .* found the empty name"):
            ScorePipeline.from_pretrained(name)
        with pytest.raises(ValueError, match=r"found the empty name"):
            load_pipeline_components(name)
    with pytest.raises(TypeError, match=r"expected a pipeline folder \(a path or a name\), found int"):
        ScorePipeline.from_pretrained(3)
    # a local folder and a shipped model have no revisions: the option is not dropped silently
    for name in (str(tmp_path / "here"), "tiny"):
        with pytest.warns(UserWarning, match=r"revision='v1' selects a version of a Hub repository; .* is a local "
                          r"folder, loaded as it is") as record:
            assert ScorePipeline.from_pretrained(name, revision="v1").sample_shape == (2,)
        assert record[0].filename == __file__  # the warning names the caller's line
    # the components loader finds shipped models by name from any directory, as from_pretrained does
    assert load_pipeline_components("tiny").model.config == ScorePipeline.from_pretrained("tiny").unet.config
    with pytest.raises(FileNotFoundError, match=r"found 'tinny': no folder .*no shipped model of that name \(the "
                       r"shipped models in .*: tiny; did you mean 'tiny'\?\)"):
        load_pipeline_components("tinny")


def test_from_pretrained_loads_the_shipped_digits_model_by_name(tmp_path, monkeypatch):
    monkeypatch.delenv(SHIPPED_MODELS_ENV_VAR, raising=False)
    try:
        folder = shipped_model_path("digits")
    except FileNotFoundError:
        pytest.skip("an installed copy without the repository's hub_cards/")
    monkeypatch.chdir(tmp_path)
    pipe = ScorePipeline.from_pretrained("digits")
    assert pipe.sample_shape == (1, 8, 8) and pipe.unet.config == ScorePipeline.from_pretrained(folder).unet.config


# ------------------------------------------------------------------------------------ diffusers' call conventions
def test_default_sampler_is_the_command_line_default():
    from score_toolkit import pipeline
    from score_toolkit.cli import sample

    assert (sample.DEFAULT_SAMPLER, sample.DEFAULT_STEPS) == (pipeline.DEFAULT_SAMPLER, pipeline.DEFAULT_STEPS)
    assert sample.DEFAULT_SAMPLER is pipeline.DEFAULT_SAMPLER
    pipe = vector_pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=3, generator=torch.Generator().manual_seed(0))
    ref = pipe(batch_size=3, sampler=pipeline.DEFAULT_SAMPLER, num_inference_steps=pipeline.DEFAULT_STEPS,
               generator=torch.Generator().manual_seed(0))
    assert (pipeline.DEFAULT_SAMPLER, pipeline.DEFAULT_STEPS) == ("unipc", 24)  # docs/fast_samplers.md, "Defaults"
    assert out.nfe == 25 and torch.equal(out.samples, ref.samples)  # 24 steps + the default to_zero step


def test_callback_on_step_end_has_diffusers_signature_and_may_replace_the_state():
    pipe = vector_pipeline()
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def cb(p, i, t, kwargs):
        assert p is pipe and set(kwargs) == {"latents"}
        seen.append((i, t, kwargs["latents"].clone()))
        return kwargs

    kw = dict(batch_size=3, sampler="euler_maruyama", num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    out = pipe(callback_on_step_end=cb, **kw)
    assert [i for i, _, _ in seen] == [0, 1, 2, 3] and seen[0][1] > seen[-1][1]
    assert torch.equal(seen[-1][2], out.samples)
    # a returned "latents" replaces the state: zeroing it after the last step gives zeros
    zeroed = pipe(callback_on_step_end=lambda p, i, t, k: {"latents": torch.zeros_like(k["latents"])} if i == 3 else k,
                  **{**kw, "generator": torch.Generator().manual_seed(0)})
    assert torch.equal(zeroed.samples, torch.zeros_like(out.samples))
    # changing the state mid-way changes what follows
    nudged = pipe(callback_on_step_end=lambda p, i, t, k: {"latents": k["latents"] + 1.0} if i == 1 else k,
                  **{**kw, "generator": torch.Generator().manual_seed(0)})
    assert not torch.allclose(nudged.samples, out.samples)
    with pytest.raises(ValueError, match="only 'latents'"):
        pipe(callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["prompt_embeds"], **kw)
    with pytest.raises(ValueError, match="shape"):
        pipe(callback_on_step_end=lambda p, i, t, k: {"latents": torch.zeros(1)}, **kw)


def test_progress_bar_follows_set_progress_bar_config():
    import io

    pipe = vector_pipeline()
    stream = io.StringIO()
    pipe.set_progress_bar_config(file=stream, desc="sampling", mininterval=0)
    pipe(batch_size=2, sampler="ancestral", num_inference_steps=5)
    assert "sampling" in stream.getvalue() and "5/5" in stream.getvalue()
    quiet = io.StringIO()
    pipe.set_progress_bar_config(file=quiet, disable=True)
    pipe(batch_size=2, sampler="ancestral", num_inference_steps=5)
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("kw, steps", [
    ({}, 25),  # the default: unipc, 24 steps and its to_zero step
    ({"sampler": "dpmpp_2m", "num_inference_steps": 5, "to_zero": False}, 5),
    ({"sampler": "heun", "num_inference_steps": 3, "to_zero": True}, 4),  # two evaluations a step, one bar step
    ({"sampler": "euler_maruyama", "num_inference_steps": 4, "denoise": True}, 5),
    ({"sampler": "unipc", "num_inference_steps": 4, "denoise": True}, 5),  # denoise in place of the default to_zero
    ({"sampler": "adaptive_ode", "rtol": 1e-2, "atol": 1e-2}, None),  # chooses its steps: no total
])
def test_progress_bar_total_is_the_steps_run(monkeypatch, kw, steps):
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    bars = recording_bars(monkeypatch, pipeline_utils)
    seen = []
    vector_pipeline()(batch_size=2, callback=seen.append, generator=torch.Generator().manual_seed(0), **kw)
    (bar,) = bars
    assert bar.n == len(seen) and (steps is None or len(seen) == steps), (bar.n, len(seen))
    assert bar.total == steps


def test_unknown_options_are_blamed_on_themselves():
    pipe = vector_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(TypeError) as err:
        pipe(num_inference_steps=10, eta=0.0)
    assert "'eta'" in str(err.value) and "no num_steps option" not in str(err.value)
    with pytest.raises(TypeError, match="no num_steps option"):
        pipe(sampler="annealed_langevin", num_inference_steps=10)


def test_save_pretrained_keeps_diffusers_folders_loadable_and_runnable(tmp_path):
    from diffusers import DiffusionPipeline

    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100, beta_end=0.2)).save_pretrained(
        tmp_path / "d")
    pipe = ScorePipeline.from_pretrained(tmp_path / "d")
    pipe.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    plain = DiffusionPipeline.from_pretrained(tmp_path / "resaved")
    plain.set_progress_bar_config(disable=True)
    assert type(plain) is DDPMPipeline
    assert plain(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 1)
    assert ScorePipeline.from_pretrained(tmp_path / "resaved").spec == pipe.spec
    # a fresh image pipeline with a stepping scheduler is written as a DDPMPipeline too; vector networks and
    # schedulers without step() are not (DDPMPipeline could load but not run them)
    image_pipeline().save_pretrained(tmp_path / "img")
    assert json.loads((tmp_path / "img" / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    vector_pipeline().save_pretrained(tmp_path / "vec")
    assert json.loads((tmp_path / "vec" / "model_index.json").read_text())["_class_name"] == "ScorePipeline"
    ve = ScorePipeline(unet=tiny_unet(), scheduler=ScoreSdeVeScheduler(sigma_max=5.0))
    assert ve.diffusers_pipeline_name() == "ScorePipeline"
