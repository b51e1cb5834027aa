"""Pipeline folders: find one (a local folder, a Hub repository in the local cache, a model shipped with
score_toolkit) and load its components strictly (:func:`load_components`, the one loader behind
:meth:`ScorePipeline.from_pretrained <score_toolkit.pipeline.ScorePipeline.from_pretrained>` and
:func:`score_toolkit.hub.load_pipeline_components`), and read what a scheduler says about the score
(:func:`scheduler_spec`).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from diffusers import SchedulerMixin

from ._warnings import caller_stacklevel
from .processes import Process

__all__ = ["load_components", "scheduler_spec", "shipped_model_path", "SHIPPED_MODELS_ENV_VAR"]

#: environment variable naming the folder that holds the shipped models (default: the repository's hub_cards/)
SHIPPED_MODELS_ENV_VAR = "SCORE_TOOLKIT_HUB_CARDS"


def scheduler_spec(scheduler) -> tuple[Process, str, str]:
    """``(process, prediction_type, time_input)`` named by a scheduler (or its config): one of
    :mod:`score_toolkit.diffusers_schedulers` carries them; any other is read with
    :func:`score_toolkit.schedulers.read_scheduler_config` (a ``ValueError`` names the field it cannot map)."""
    from .diffusers_schedulers import is_score_scheduler
    from .schedulers import read_scheduler_config

    if is_score_scheduler(scheduler):
        return scheduler.process, scheduler.prediction_type, scheduler.time_input
    return read_scheduler_config(scheduler)


#: what is downloaded of a Hub repository: what loading reads (configs, safetensors weights, the model card, stored
#: grids), never pickle weights (``.bin``, ``.ckpt``), which are not loaded
HUB_FILES = ("model_index.json", "README.md", "unet/*.json", "unet/*.safetensors", "scheduler/*.json", "grids/*.json")


def _resolve_folder(name_or_path, *, revision, cache_dir, local_files_only, token) -> Path:
    """An existing folder; else the shipped model of that name (:func:`_shipped_folder`); else a Hub repository.
    An empty name is an error (it is not the current directory); ``revision`` with a local folder or a shipped
    model, which have no revisions, is a warning."""
    local = _local_folder(name_or_path)
    if local is not None:
        if revision is not None:
            warnings.warn(f"revision={revision!r} selects a version of a Hub repository; {local} is a local folder, "
                          "loaded as it is", UserWarning, stacklevel=caller_stacklevel())
        return local
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        raise FileNotFoundError(f"expected a pipeline folder, the name of a shipped model or a Hub repository id, found "
                                f"{text!r}: no folder {path.absolute()}, no shipped model of that name ({_shipped_names(text)}), "
                                "and not a valid Hub repository id") from None

    try:
        snapshot = snapshot_download(text, revision=revision, cache_dir=cache_dir, token=token,
                                     local_files_only=bool(local_files_only),
                                     allow_patterns=list(HUB_FILES))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HFValidationError, OSError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        hint = " (HF_HUB_OFFLINE is set: only repositories already in the local Hub cache load)" if offline else ""
        raise FileNotFoundError(
            f"expected a pipeline folder, the name of a shipped model or a Hub repository at {text!r}: there is no "
            f"such folder, no shipped model of that name ({_shipped_names(text)}), and the Hub repository could not "
            f"be loaded{hint}: {err}"
        ) from err
    return Path(snapshot)


def _local_folder(name_or_path) -> Path | None:
    """An existing folder of that path, else the shipped model of that name (:func:`_shipped_folder`), else ``None``;
    an empty name or an existing file is an error."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"expected a pipeline folder (a path or a name), found {type(name_or_path).__name__}")
    text = os.fspath(name_or_path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise ValueError(f"expected a pipeline folder, the name of a shipped model or a Hub repository id, found "
                         f"the empty name {text!r}")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"expected a pipeline folder, found the file {path}")
        return path
    return _shipped_folder(text)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"expected {what} at {path}, found nothing there")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt {what} {path} (expected JSON text in UTF-8): {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"expected {what} {path} to hold a JSON object, found {type(data).__name__}")
    return data


def _scheduler_class(lib: str, name: str):
    from . import diffusers_schedulers, schedulers

    if lib == "diffusers":
        import diffusers

        cls = getattr(diffusers, name, None)
        if isinstance(cls, type) and issubclass(cls, SchedulerMixin):
            return cls
    ours = {
        ("score_toolkit.schedulers", "ScoreSDEScheduler"): schedulers.ScoreSDEScheduler,
        **{("score_toolkit.diffusers_schedulers", c.__name__): c for c in diffusers_schedulers.SCHEDULER_CLASSES.values()},
    }
    if (lib, name) in ours:
        return ours[(lib, name)]
    raise ValueError(
        f"model_index.json field 'scheduler': expected a diffusers scheduler or one of score_toolkit's "
        f"({', '.join(sorted(n for _, n in ours))}), found [{lib!r}, {name!r}]; code named by a folder is never imported"
    )


def load_components(folder: Path, torch_dtype=None) -> dict[str, Any]:
    """The one folder loader, behind :meth:`ScorePipeline.from_pretrained
    <score_toolkit.pipeline.ScorePipeline.from_pretrained>` and :func:`score_toolkit.hub.load_pipeline_components`:
    ``{"unet": network in eval() mode, "scheduler": scheduler}`` of a pipeline folder. Only JSON and safetensors
    are read and no code named by the folder is imported: the network class must be a diffusers model or
    score_toolkit's own, the scheduler a diffusers scheduler or score_toolkit's; both configs are read strictly
    (unknown keys are errors) and the network is loaded with :func:`score_toolkit.models.load_model`."""
    from ._config import strict_config
    from .diffusers_schedulers import SCHEDULER_CLASSES, score_scheduler_config_keys
    from .models import load_model
    from .schedulers import scheduler_config_keys

    index_file = folder / "model_index.json"
    if not index_file.is_file():
        found = sorted(p.name for p in folder.iterdir())[:10]
        raise FileNotFoundError(
            f"{folder} is not a pipeline folder: expected model_index.json in it, found {found or 'an empty folder'}"
        )
    index = _read_json(index_file, "model_index.json")
    components = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    for key in ("unet", "scheduler"):
        entry = index.get(key)
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise ValueError(f"{index_file} field {key!r}: expected [library, class], found {entry!r}")
    extra = sorted(components - {"unet", "scheduler"})
    if extra:
        raise ValueError(
            f"{index_file}: ScorePipeline has the components unet and scheduler; this pipeline "
            f"({index.get('_class_name')}) also has {extra}"
        )
    sched_cls = _scheduler_class(*index["scheduler"])
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched_config = _read_json(sched_file, "the scheduler config")
    if sched_config.get("_class_name") != sched_cls.__name__:
        raise ValueError(
            f"{sched_file} field '_class_name': expected {sched_cls.__name__} (as model_index.json says), "
            f"found {sched_config.get('_class_name')!r}"
        )
    if sched_cls in SCHEDULER_CLASSES.values():
        keys = score_scheduler_config_keys(sched_cls)
    else:
        keys = scheduler_config_keys(sched_cls.__name__)
    try:
        # strict like the network config: unknown keys are errors and the values in the file are the ones used
        scheduler = sched_cls.from_config(strict_config(sched_config, keys, "the scheduler config"))
        scheduler_spec(scheduler)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{sched_file}: {err}") from err
    unet_lib, unet_name = index["unet"]
    unet_config = _read_json(folder / "unet" / "config.json", "the network config")
    if unet_config.get("_class_name") != unet_name:
        raise ValueError(
            f"{folder / 'unet' / 'config.json'} field '_class_name': expected {unet_name} (as model_index.json "
            f"says), found {unet_config.get('_class_name')!r}"
        )
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    model = load_model(None, str(folder), subfolder="unet", **kwargs)
    if unet_lib != "diffusers" and type(model).__module__ != unet_lib:
        raise ValueError(
            f"{index_file} field 'unet': expected the module of {unet_name} to be {type(model).__module__}, "
            f"found {unet_lib!r}; code named by a folder is never imported"
        )
    model.eval()
    return {"unet": model, "scheduler": scheduler}


def _shipped_base() -> Path:
    env = os.environ.get(SHIPPED_MODELS_ENV_VAR)
    return Path(env).expanduser() if env else Path(__file__).resolve().parent.parent / "hub_cards"


def _shipped_folder(name_or_path: str | os.PathLike) -> Path | None:
    """The shipped model that ``name_or_path`` names, from any directory: exactly ``digits`` or ``hub_cards/digits``
    (as written, relative) gives :func:`shipped_model_path` ``("digits")`` when that model is there; anything else,
    ``./digits`` or a longer path ending in ``hub_cards/digits`` included, gives ``None``: a path the user wrote out is
    never swapped for the shipped model. (Callers look for an existing folder of that name first: a user's own
    folder wins.)"""
    text = os.fspath(name_or_path).replace(os.sep, "/")
    parts = text.split("/")
    if len(parts) == 2 and parts[0] == "hub_cards":
        parts = parts[1:]
    if len(parts) != 1 or parts[0] in ("", ".", "..", "~"):
        return None
    try:
        return shipped_model_path(parts[-1])
    except (FileNotFoundError, ValueError, OSError):
        return None


def _shipped_names(name: str) -> str:
    """The shipped models, for an error about ``name``: their names, where they are, the closest one."""
    import difflib

    base = _shipped_base()
    names = sorted(p.name for p in base.iterdir() if (p / "model_index.json").is_file()) if base.is_dir() else []
    bare = "/" not in name.replace(os.sep, "/")  # a Hub id or a path ending in a shipped name gets no suggestion
    close = difflib.get_close_matches(name, names, n=1) if bare else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"the shipped models in {base}: {', '.join(names) or 'none'}{hint}"


def shipped_model_path(name: str = "digits") -> Path:
    """The folder of a model shipped with score_toolkit (``hub_cards/<name>`` of the repository, found next to
    the package; or under ``$SCORE_TOOLKIT_HUB_CARDS``). A ``FileNotFoundError`` says how to get it."""
    env = os.environ.get(SHIPPED_MODELS_ENV_VAR)
    base = _shipped_base()
    folder = base / name
    if not (folder / "model_index.json").is_file():
        where = f"${SHIPPED_MODELS_ENV_VAR}={env}" if env else "the repository's hub_cards/ folder next to the package"
        raise FileNotFoundError(
            f"the shipped {name!r} model is not at {folder} (looked in {where}). It ships in the score_toolkit "
            f"repository; with an installed copy without it, set {SHIPPED_MODELS_ENV_VAR} to a folder holding "
            f"{name}/, pass a checkpoint folder instead, or train it: score-toolkit train --config "
            f"hub_cards/configs/{name}.yaml"
        )
    return folder
