"""The data sets' names and the options each accepts (one table), and the checks of option values shared by
the loaders of :mod:`score_toolkit.data`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

TOY_DATASETS = ("ring", "checkerboard", "swiss_roll", "moons", "circles")
DATASETS = (*TOY_DATASETS, "digits", "image_folder", "hf", "vectors")

# options each dataset accepts besides ``name`` (with defaults)
OPTIONS: dict[str, dict[str, Any]] = {
    "ring": {"num_samples": 10000, "seed": 0, "num_modes": 8, "radius": 4.0, "std": 0.2},
    "checkerboard": {"num_samples": 10000, "seed": 0},
    "swiss_roll": {"num_samples": 10000, "seed": 0, "noise": 0.1},
    "moons": {"num_samples": 10000, "seed": 0, "noise": 0.05},
    "circles": {"num_samples": 10000, "seed": 0, "noise": 0.05, "factor": 0.5},
    "digits": {},
    "image_folder": {"path": None, "image_size": 32, "channels": 3, "center_crop": True, "random_flip": False,
                     "interpolation": "bicubic", "num_workers": 0, "labels": False},
    "hf": {"path": None, "split": "train", "data_dir": None, "data_files": None, "config_name": None,
           "streaming": False, "image_column": "image", "label_column": None, "num_classes": None,
           "image_size": None, "channels": None, "center_crop": True, "random_flip": False,
           "interpolation": "bilinear", "shuffle_buffer": 1000, "num_workers": 0, "cache_dir": None},
    "vectors": {"path": None, "key": None},
}


def check_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    allowed = OPTIONS[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"dataset {name!r}: unknown option(s) {unknown}; its options are {sorted(allowed) or 'none'}")
    return {**allowed, **options}


def positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected {what} to be a positive int, found {value!r}")
    return value


def nonneg_float(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
        raise ValueError(f"expected {what} to be a finite number >= 0, found {value!r}")
    return float(value)


def bool_option(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected {what} to be true or false, found {value!r}")
    return value


def num_workers_option(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected {where} option num_workers to be an int >= 0, found {value!r}")
    return value
