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
epsilon/v/x0 network that receives the table index, in plain diffusers' ``DDPMPipeline``. The model cards are
written by :mod:`score_toolkit.model_cards` (its public names are importable from here too).
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

from ._io import default_file_mode, process_exists
from .model_cards import (  # noqa: F401  (RESULTS_BEGIN/RESULTS_END: the card markers, read through hub)
    MODEL_MEASUREMENTS,
    RESULTS_BEGIN,
    RESULTS_END,
    SAMPLING_NOTE,
    SAMPLING_NOTE_LABELS,
    TEMPLATES_DIR,
    check_result,
    ddpm_pipeline_runs,
    label_classes,
    render_model_card,
    results_markdown,
    update_model_card,
)
from .processes import Process
from .schedulers import scheduler_for

__all__ = ["export_pipeline", "load_pipeline_components", "PipelineComponents", "render_model_card",
           "update_model_card", "check_result", "results_markdown", "MODEL_MEASUREMENTS", "TEMPLATES_DIR",
           "ALLOWED_SUFFIXES"]

#: the only kinds of files an exported folder contains (no pickles)
ALLOWED_SUFFIXES = (".json", ".safetensors", ".md", ".png")
#: what an export folder holds: the files and folders :func:`export_pipeline` writes, and ``grids/`` (the model's
#: fitted grids, :mod:`score_toolkit.model_grids`). ``overwrite=True`` replaces a folder holding nothing else.
EXPORT_FILES = ("model_index.json", "README.md", "sample.png")
EXPORT_DIRS = ("scheduler", "unet", "grids")


def weight_file_pattern(variant: str | None = None) -> re.Pattern:
    """diffusers' names of a model's safetensors weights of ``variant``: one file
    (``diffusion_pytorch_model[.VARIANT].safetensors``), shards (``...[.VARIANT]-0000K-of-0000N.safetensors``) and
    their index (``diffusion_pytorch_model.safetensors.index[.VARIANT].json``)."""
    tag = re.escape(f".{variant}") if variant else ""
    return re.compile(rf"diffusion_pytorch_model{tag}(-\d{{5}}-of-\d{{5}})?\.safetensors"
                      rf"|diffusion_pytorch_model\.safetensors\.index{tag}\.json")


#: the files an export writes in its subfolders (diffusers' names; weights possibly sharded)
_EXPORT_MEMBERS = {
    "unet": re.compile(rf"config\.json|{weight_file_pattern().pattern}"),
    "scheduler": re.compile(r"scheduler_config\.json"),
}


def _written_by_export(path: Path, rel: tuple[str, ...]) -> bool:
    """Whether the regular file ``path`` (``rel`` inside the folder) is one an export or ``fit_model_grids`` writes."""
    if len(rel) == 1:
        return rel[0] in EXPORT_FILES
    if len(rel) == 2 and rel[0] in _EXPORT_MEMBERS:
        return _EXPORT_MEMBERS[rel[0]].fullmatch(rel[1]) is not None
    if len(rel) == 2 and rel[0] == "grids":
        from .model_grids import _read as fitted_grid_record

        return path.suffix == ".json" and fitted_grid_record(path) is not None
    return False


def foreign_export_files(folder) -> list[str]:
    """The files of an existing ``folder`` that no export writes (relative paths, sorted): an export with
    ``overwrite=True`` refuses such a folder rather than delete them. Those an export writes are named exactly
    (``unet/config.json``, its weights, ``scheduler/scheduler_config.json``, ``model_index.json``, ``README.md``,
    ``sample.png``) and the grids in ``grids/`` are the ones ``fit_model_grids`` wrote; anything else (a note in
    ``unet/``, a grid saved by hand) is foreign."""
    folder = Path(folder)
    found = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).parts
        if p.is_dir() and not p.is_symlink() and len(rel) == 1 and rel[0] in EXPORT_DIRS:
            continue
        if not p.is_symlink() and p.is_file() and _written_by_export(p, rel):
            continue
        if p.is_dir() and not p.is_symlink() and any(q.is_file() or q.is_symlink() for q in p.rglob("*")):
            continue  # a folder is reported through its files
        found.append("/".join(rel) + ("/" if p.is_dir() and not p.is_symlink() else ""))
    return found


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
        template: a Jinja2 model card template (default: the package's ``templates/score_model.md``).

    Returns the folder's path.
    """
    from diffusers import DDPMPipeline, ModelMixin

    if not isinstance(model, ModelMixin):
        raise TypeError(f"expected a diffusers ModelMixin (ScoreMLP, EnergyMLP, UNet2DModel, ...), found {type(model).__name__}")
    folder = Path(folder)
    _remove_stale_export_temporaries(folder)  # first: an export killed between its renames is restored
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists: pass overwrite=True to replace it")
    if folder.is_dir():
        foreign = foreign_export_files(folder)
        if foreign:
            raise FileExistsError(f"{folder} holds files an export does not write ({', '.join(foreign[:5])}"
                                  f"{', ...' if len(foreign) > 5 else ''}): overwrite=True replaces an earlier export "
                                  f"only; move them away or choose another folder")
    scheduler = scheduler_for(process, prediction_type, time_input)
    info = dict(card_info or {})
    folder.parent.mkdir(parents=True, exist_ok=True)
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
            index["_sampling"] = SAMPLING_NOTE if label_classes(model) is None else SAMPLING_NOTE_LABELS
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
    """Remove the temporary folders an export or a ``save_pretrained`` of ``folder`` killed midway left
    (``.NAME.tmp-PID`` and ``.NAME.old-PID`` beside it, ``.save.tmp-PID`` inside it: names only these writers use)
    whose process no longer runs. An export killed between its two renames left the earlier export as
    ``.NAME.old-PID`` and no ``folder``: it is renamed back, not removed (it is the only copy)."""
    beside = re.compile(rf"\.{re.escape(folder.name)}\.(tmp|old)-(\d+)")
    inside = re.compile(r"\.save\.tmp-(\d+)")
    found = []
    if folder.parent.is_dir():
        found += [(p, m.group(1), int(m.group(2))) for p in folder.parent.iterdir() if (m := beside.fullmatch(p.name))]
    if folder.is_dir() and not folder.is_symlink():
        found += [(p, "tmp", int(m.group(1))) for p in folder.iterdir() if (m := inside.fullmatch(p.name))]
    for p, kind, pid in sorted(found, key=lambda f: f[1] != "old"):  # a restored folder first
        if not p.is_dir() or p.is_symlink() or (pid != os.getpid() and process_exists(pid)):
            continue  # another export or save of the same folder is running
        if kind == "old" and not os.path.lexists(folder):
            os.rename(p, folder)
        else:
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------- load
def load_pipeline_components(folder) -> PipelineComponents:
    """Load an exported folder: ``(model, process, prediction_type, time_input)``.

    Only JSON and safetensors are read; the classes named in ``model_index.json`` must be diffusers models
    or score_toolkit's own (nothing named by the folder is imported). The network is loaded strictly
    (:func:`score_toolkit.models.load_model`: safetensors only; a missing, unexpected or mis-shaped weight,
    or a corrupt file, is an error) and returned in ``eval()`` mode; the scheduler names the process
    (:func:`~score_toolkit.folders.scheduler_spec`). Also reads plain diffusers DDPM folders
    (``DDPMScheduler`` + ``UNet2DModel``) and score-SDE VE folders. ``folder`` is a path, or the name of a shipped
    model (``"digits"``, ``"hub_cards/digits"``) from any directory, as for ``ScorePipeline.from_pretrained``. The same loader as
    :meth:`ScorePipeline.from_pretrained <score_toolkit.pipeline.ScorePipeline.from_pretrained>`
    (:func:`score_toolkit.folders.load_components`)."""
    from .folders import _local_folder, _shipped_names, load_components, scheduler_spec

    found = _local_folder(folder)
    if found is None:
        raise FileNotFoundError(f"expected a pipeline folder or the name of a shipped model, found {os.fspath(folder)!r}: "
                                f"no folder {Path(os.fspath(folder)).expanduser().absolute()}, no shipped model of that name "
                                f"({_shipped_names(os.fspath(folder))})")
    components = load_components(found)
    model = components["unet"]
    process, prediction_type, time_input = scheduler_spec(components["scheduler"])
    return PipelineComponents(model, process, prediction_type, time_input)
