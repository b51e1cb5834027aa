"""Hub-style folders: export a trained score network with its scheduler config and model card, and load one
back (safetensors only, never code from the folder).

Layout written by :func:`export_pipeline` (a diffusers ``DDPMPipeline`` folder)::

    folder/
      model_index.json                     {"_class_name": "DDPMPipeline", "unet": [lib, class], "scheduler": [lib, class]}
      unet/config.json
      unet/diffusion_pytorch_model.safetensors
      scheduler/scheduler_config.json      the process, prediction type and time input (score_toolkit.schedulers)
      README.md                            model card: YAML metadata + how to load, process, objective, results, config
      sample.png                           samples of the model (when given)

It loads with ``diffusers.DiffusionPipeline.from_pretrained(folder)`` once ``score_toolkit`` is imported
(our components are named by their module path, which must be importable), with
:func:`load_pipeline_components` here, and, for a :class:`~score_toolkit.processes.DiscreteVP`
epsilon/v/x0 network that receives the table index, in plain diffusers' ``DDPMPipeline``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ._io import default_file_mode
from .processes import Process
from .schedulers import scheduler_for

__all__ = ["export_pipeline", "load_pipeline_components", "PipelineComponents", "render_model_card",
           "TEMPLATES_DIR", "ALLOWED_SUFFIXES"]

#: model card templates (Jinja2, as huggingface_hub's ModelCard.from_template reads them)
TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "hub_cards" / "templates"
DEFAULT_TEMPLATE = "score_model.md"
#: the only kinds of files an exported folder contains (no pickles)
ALLOWED_SUFFIXES = (".json", ".safetensors", ".md", ".png")

# used when the repository's hub_cards/templates is not there (e.g. a wheel install)
_FALLBACK_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

## How to load and sample

```python
{{ load_snippet }}
```

## Results

{{ results_table }}

## Training

{{ training_section }}
"""


class PipelineComponents(NamedTuple):
    """What :func:`load_pipeline_components` returns (unpacks as a 4-tuple)."""

    model: torch.nn.Module
    process: Process
    prediction_type: str
    time_input: str


# ---------------------------------------------------------------------------------------- export
def export_pipeline(
    model,
    process: Process,
    prediction_type: str,
    time_input: str,
    folder,
    card_info: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    template: str | os.PathLike | None = None,
) -> Path:
    """Write ``model`` (a diffusers ``ModelMixin``: ScoreMLP, EnergyMLP, UNet2DModel, ...) and the scheduler
    that encodes ``(process, prediction_type, time_input)`` as a Hub-style folder, atomically (everything
    is written into a temporary sibling folder, fsynced, then renamed into place).

    Args:
        folder: the target; an existing folder is an error unless ``overwrite=True``.
        card_info: what the model card reports (all optional): ``model_name``, ``license``,
            ``dataset_name``, ``dataset_description``, ``dataset_id`` (a Hub data-set id), ``objective``,
            ``training_config_yaml``, ``command`` (the exact command that trained it), ``results`` (a list
            of dicts name/type/value/dataset: the model-index), ``sample_image`` (a PIL image, saved as
            ``sample.png``), ``sampler``, ``steps``, ``num_processes``, ``sample_shape``, ``tags``, ``notes``.
        template: a Jinja2 model card template (default ``hub_cards/templates/score_model.md``).

    Returns the folder's path.
    """
    from diffusers import DDPMPipeline, ModelMixin

    if not isinstance(model, ModelMixin):
        raise TypeError(f"expected a diffusers ModelMixin (ScoreMLP, EnergyMLP, UNet2DModel, ...), found {type(model).__name__}")
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists: pass overwrite=True to replace it")
    scheduler = scheduler_for(process, prediction_type, time_input)
    info = dict(card_info or {})
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_export_temporaries(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        was_training = model.training
        model.eval()
        DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(str(tmp), safe_serialization=True)
        model.train(was_training)
        if not ddpm_pipeline_runs(model, scheduler):  # say how to sample it where diffusers looks first
            index = json.loads((tmp / "model_index.json").read_text(encoding="utf-8"))
            index["_sampling"] = SAMPLING_NOTE
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        image = info.pop("sample_image", None)
        if image is not None:
            from .plotting import save_png

            save_png(image, tmp / "sample.png")
        card = render_model_card(model, process, prediction_type, time_input, scheduler, info,
                                 has_sample_image=image is not None, template=template)
        card.save(str(tmp / "README.md"))
        bad = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file() and p.suffix not in ALLOWED_SUFFIXES)
        if bad:
            raise RuntimeError(f"export wrote unexpected files {bad} (only {ALLOWED_SUFFIXES} are allowed)")
        mode = default_file_mode()
        for p in tmp.rglob("*"):
            if p.is_file():
                os.chmod(p, mode)  # some writers use private temporary files (0600)
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if folder.exists():
            trash = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.rename(folder, trash)
            os.rename(tmp, folder)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _remove_stale_export_temporaries(folder: Path) -> None:
    """Remove the temporary folders an export of ``folder`` killed midway left (``.NAME.tmp-PID`` and
    ``.NAME.old-PID``, the names only this function's writer uses) whose process no longer runs."""
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(tmp|old)-(\d+)")
    if not folder.parent.is_dir():
        return
    for p in folder.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m is None or not p.is_dir() or p.is_symlink():
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and _process_exists(pid):
            continue  # another export of the same folder is running
        shutil.rmtree(p, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _component_origin(obj) -> tuple[str, str]:
    module = type(obj).__module__
    return ("diffusers" if module.startswith("diffusers") else module), type(obj).__name__


def _results_table(results) -> str:
    if not results:
        return "No measurements were recorded."
    lines = ["| measurement | value |", "| --- | --- |"]
    for r in results:
        lines.append(f"| {r['name']} | {r['value']} |")
    return "\n".join(lines)


def render_model_card(model, process: Process, prediction_type: str, time_input: str, scheduler,
                      info: Mapping[str, Any], *, has_sample_image: bool = False, template=None):
    """The :class:`huggingface_hub.ModelCard` of an exported folder (offline: no validation against the Hub).

    Metadata: ``library_name`` is ``diffusers`` when plain diffusers can load the folder (diffusers
    network and scheduler) and ``score-toolkit`` otherwise; ``pipeline_tag`` is
    ``unconditional-image-generation`` for image networks; ``model-index`` holds ``info['results']``."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    unet_lib, unet_cls = _component_origin(model)
    sched_lib, sched_cls = _component_origin(scheduler)
    plain_diffusers = unet_lib == "diffusers" and sched_lib == "diffusers"
    ddpm_runs = ddpm_pipeline_runs(model, scheduler)
    is_image = unet_cls == "UNet2DModel" or (len(info.get("sample_shape") or []) == 3)
    model_name = info.get("model_name") or f"score-toolkit-{unet_cls.lower()}"
    dataset_name = info.get("dataset_name") or "unknown"
    task = "unconditional-image-generation" if is_image else "unconditional-generation"
    eval_results = [
        EvalResult(task_type=task, dataset_type=info.get("dataset_id") or dataset_name,
                   dataset_name=info.get("dataset_description") or dataset_name,
                   metric_type=r["type"], metric_name=r["name"], metric_value=r["value"])
        for r in info.get("results") or []
    ]
    tags = ["score-toolkit", "score-based-generative-modeling", "diffusion", f"process:{type(process).__name__}",
            f"prediction:{prediction_type}"]
    if not plain_diffusers:
        tags.append("diffusers")
    tags += list(info.get("tags") or [])
    card_data = ModelCardData(
        library_name="diffusers" if plain_diffusers else "score-toolkit",
        license=info.get("license") or "apache-2.0",
        tags=tags,
        pipeline_tag="unconditional-image-generation" if is_image else None,
        datasets=[info["dataset_id"]] if info.get("dataset_id") else None,
        model_name=model_name,
        eval_results=eval_results or None,
        training_data=info.get("dataset_description") or dataset_name,
        score_toolkit={"process": _process_summary(process), "prediction_type": prediction_type,
                       "time_input": time_input, "objective": info.get("objective")},
    )
    num_params = sum(p.numel() for p in model.parameters())
    summary_lines = [
        f"A score-based generative model trained with score_toolkit on "
        f"{info.get('dataset_description') or dataset_name}.",
        "",
        f"- **Network**: `{unet_cls}` ({num_params:,} parameters), stored as `unet/` (safetensors)",
        f"- **Forward process**: `{process!r}`",
        f"- **Prediction type**: `{prediction_type}`; **time input** to the network: `{time_input}`",
        f"- **Scheduler component**: `{sched_cls}` (`scheduler/scheduler_config.json` encodes the process, "
        f"the prediction type and the time input)",
        f"- **Objective**: `{info.get('objective') or 'unknown'}`",
    ]
    if info.get("sampler"):
        summary_lines.append(f"- **Samples below and measurements**: drawn with `{info['sampler']}`")
    if has_sample_image:
        summary_lines += ["", "![samples](sample.png)"]
    if info.get("notes"):
        summary_lines += ["", str(info["notes"])]
    training = []
    if info.get("command"):
        command = str(info["command"]).strip()
        lead = ("Trained with exactly these commands, in order (a resumed run lists each invocation):"
                if "\n" in command else "Trained with exactly this command:")
        training += [lead, "", "```bash", command, "```", ""]
    if info.get("steps") is not None:
        training.append(f"{info['steps']} optimizer steps on {info.get('num_processes', 1)} process(es).")
        training.append("")
    if info.get("training_config_yaml"):
        training += ["Resolved training configuration:", "", "```yaml", str(info["training_config_yaml"]).rstrip(), "```"]
    kwargs = {
        "model_name": model_name,
        "summary": "\n".join(summary_lines),
        "load_snippet": _load_snippet(plain_diffusers, unet_cls, sched_cls, prediction_type, is_image),
        "results_table": _results_table(info.get("results")),
        "training_section": "\n".join(training) or "No training information was recorded.",
        "plain_diffusers": plain_diffusers,
        "ddpm_runs": ddpm_runs,
    }
    path = Path(template) if template is not None else TEMPLATES_DIR / DEFAULT_TEMPLATE
    if template is not None and not path.is_file():
        raise FileNotFoundError(f"expected a model card template at {path}, found nothing there")
    if path.is_file():
        return ModelCard.from_template(card_data, template_path=str(path), **kwargs)
    return ModelCard.from_template(card_data, template_str=_FALLBACK_TEMPLATE, **kwargs)


def ddpm_pipeline_runs(model, scheduler) -> bool:
    """Whether diffusers' ``DDPMPipeline`` (the class an exported ``model_index.json`` names) can *run* these
    components, not only load them: an image network (``sample_size``, ``in_channels``), a scheduler with
    ``step()``, and a unit-variance prior (DDPMPipeline draws N(0, I) noise)."""
    cfg = model.config
    return (cfg.get("sample_size") is not None and cfg.get("in_channels") is not None
            and callable(getattr(scheduler, "step", None))
            and float(getattr(scheduler, "init_noise_sigma", 1.0)) == 1.0)


#: what an exported model_index.json says when DDPMPipeline can load but not run the folder
SAMPLING_NOTE = ("DDPMPipeline loads these components but cannot sample them (its loop needs an image network and "
                 "a scheduler with step()); sample with score_toolkit: import score_toolkit; "
                 "ScorePipeline.from_pretrained(folder)(batch_size=16) (see README.md)")


def _process_summary(process: Process) -> dict[str, Any]:
    cfg = {k: v for k, v in process.config.items() if not k.startswith("_") and k != "alphas_cumprod"}
    return {"class": type(process).__name__, **cfg}


def _load_snippet(plain_diffusers: bool, unet_cls: str, sched_cls: str, prediction_type: str, is_image: bool) -> str:
    lines = [
        "import torch",
        "import score_toolkit  # makes score_toolkit's components loadable by diffusers",
        "from diffusers import DiffusionPipeline",
        "from score_toolkit.hub import load_pipeline_components",
        "from score_toolkit.registry import get_sampler",
        "from score_toolkit.scores import ScoreAdapter",
        "",
        "folder = \"path/to/this/folder\"  # or a local snapshot of the Hub repository",
        "pipe = DiffusionPipeline.from_pretrained(folder)  # diffusers view: pipe.unet, pipe.scheduler",
        "",
        "# score_toolkit view: safetensors only, strict, never runs code from the folder",
        "model, process, prediction_type, time_input = load_pipeline_components(folder)",
        "score_fn = ScoreAdapter(model, process, prediction_type, time_input)",
        "sampler = get_sampler(\"ancestral\", num_steps=500, denoise=True)",
        "shape = " + ("(16, model.config.in_channels, model.config.sample_size, model.config.sample_size)"
                      if is_image else "(1000, model.config.dim)"),
        "samples = sampler.sample(score_fn, process, shape=shape, generator=torch.Generator().manual_seed(0)).samples",
    ]
    if plain_diffusers and sched_cls == "DDPMScheduler":
        lines += [
            "",
            "# plain diffusers (no score_toolkit needed for this one):",
            "from diffusers import DDPMPipeline",
            "images = DDPMPipeline.from_pretrained(folder)(batch_size=16, num_inference_steps=1000, output_type=\"np\").images",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- load
def load_pipeline_components(folder) -> PipelineComponents:
    """Load an exported folder: ``(model, process, prediction_type, time_input)``.

    Only JSON and safetensors are read; the classes named in ``model_index.json`` must be diffusers models
    or score_toolkit's own (nothing named by the folder is imported). The network is loaded strictly
    (:func:`score_toolkit.models.load_model`: safetensors only; a missing, unexpected or mis-shaped weight,
    or a corrupt file, is an error) and returned in ``eval()`` mode; the scheduler names the process
    (:func:`~score_toolkit.pipeline.scheduler_spec`). Also reads plain diffusers DDPM folders
    (``DDPMScheduler`` + ``UNet2DModel``) and score-SDE VE folders. The same loader as
    :meth:`ScorePipeline.from_pretrained <score_toolkit.pipeline.ScorePipeline.from_pretrained>`."""
    from .pipeline import _load_components, scheduler_spec

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"expected a pipeline folder at {folder}, found nothing there")
    components = _load_components(folder, None)
    model = components["unet"]
    process, prediction_type, time_input = scheduler_spec(components["scheduler"])
    return PipelineComponents(model, process, prediction_type, time_input)
