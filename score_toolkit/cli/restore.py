"""The ``restore`` command: inverse problems with a trained model as the prior.

``score-toolkit restore IMAGE [--checkpoint DIR] --task inpaint|super_resolution|colorize|deblur [options]``

IMAGE is the observation (a PNG/JPEG read in [0, 1] and mapped to the model's [-1, 1]): for ``inpaint`` an image of
the model's size with a mask (``--mask FILE``, white = observed, or ``--mask-kind``), for ``super_resolution`` an image
``--factor`` times smaller, for ``colorize`` a greyscale image of the model's size (a 3-channel model), for ``deblur`` a
blurred image. With ``--degrade`` IMAGE is a clean image of the model's size that the operator (plus
``--noise-std`` noise) degrades first: a synthetic task whose truth is known. Methods: the score transforms
``pigdm`` (default), ``dps``, ``replacement``, and the samplers ``repaint`` and ``imputation`` (docs/conditioning.md).
Writes OUTPUT_DIR/restored.png (observation, then the restorations), restored.safetensors and manifest.json; files of
that name already there are replaced only with --overwrite or when manifest.json records the same settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import OPTION_HELP, CLIError, check_seed, parse_options, progress_enabled, run_guarded, usage_checks

__all__ = ["add_restore_parser", "cmd_restore", "TASKS", "MASK_KINDS", "METHODS"]

TASKS = ("inpaint", "super_resolution", "colorize", "deblur")
MASK_KINDS = ("left_half", "right_half", "top_half", "bottom_half", "center", "random_half")
METHODS = ("pigdm", "dps", "replacement", "repaint", "imputation")


def add_restore_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "restore",
        help="inpainting, super-resolution, colourisation or deblurring with a trained model as the prior",
        description=__doc__.split("\n\n", 2)[2].replace("``", ""),  # plain text in a terminal
    )
    p.add_argument("image", help="the observation (or, with --degrade, the clean image to degrade first)")
    p.add_argument("--checkpoint", default=None,
                   help="pipeline folder or a shipped model's name (default: the shipped digits model)")
    p.add_argument("--task", choices=TASKS, required=True, help="the degradation to undo")
    p.add_argument("--mask", default=None, help="inpaint: mask image of the model's size, white = observed")
    p.add_argument("--mask-kind", choices=MASK_KINDS, default=None, help="inpaint: a built-in mask instead of --mask")
    p.add_argument("--factor", type=int, default=None, help="super_resolution: downsampling factor (default 2)")
    p.add_argument("--blur-std", type=float, default=None, help="deblur: Gaussian blur std in pixels (default 1)")
    p.add_argument("--noise-std", type=float, default=0.0,
                   help="observation noise std in model units ([-1, 1]); needed > 0 by dps (default 0)")
    p.add_argument("--degrade", action="store_true", help="apply the operator (and noise) to IMAGE first")
    p.add_argument("--method", choices=METHODS, default="pigdm",
                   help="how the observation conditions the sampling (default pigdm; docs/conditioning.md)")
    p.add_argument("--sampler", default=None,
                   help="sampler for the score-transform methods pigdm, dps, replacement (default ancestral); "
                   "repaint and imputation are samplers themselves")
    p.add_argument("--steps", type=int, default=None, help="the sampler's num_steps (default 100)")
    p.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE", help=OPTION_HELP)
    p.add_argument("--num-samples", type=int, default=4, help="restorations to draw (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the restorations (one generator per sample) and of "
                   "the added noise and built-in masks (default 0)")
    p.add_argument("--output-dir", default="restored", help="output folder (default ./restored)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace restored.png, restored.safetensors and manifest.json of another run in the output "
                   "folder (nothing else is touched)")
    p.set_defaults(func=cmd_restore)


def cmd_restore(args: argparse.Namespace) -> int:
    return run_guarded("restore", _run, args)


def _read_image(path: str, channels: int):
    import numpy as np
    import torch
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot read the image {path!r}: {err}") from None
    img = img.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    return x * 2 - 1


def _builtin_mask(kind: str, h: int, w: int, seed: int):
    import torch

    m = torch.zeros(1, h, w)
    if kind == "left_half":
        m[..., : w // 2] = 1
    elif kind == "right_half":
        m[..., w // 2:] = 1
    elif kind == "top_half":
        m[:, : h // 2] = 1
    elif kind == "bottom_half":
        m[:, h // 2:] = 1
    elif kind == "center":  # everything but a centred box of half the side
        m[:] = 1
        m[:, h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2] = 0
    else:
        g = torch.Generator().manual_seed(seed)
        m = (torch.rand(1, h, w, generator=g) < 0.5).float()
    return m


#: the files restore writes into --output-dir
MANIFEST = "manifest.json"
OUTPUT_FILES = ("restored.png", "restored.safetensors", MANIFEST)


def _check_args(args: argparse.Namespace) -> dict:
    """The options alone, before any work: values, and options that do not apply (refused, as in sample). Returns
    the run's settings (what manifest.json records)."""
    import os

    if args.num_samples < 1 or (args.steps is not None and args.steps < 1):
        raise CLIError(f"expected --num-samples and --steps >= 1, found {args.num_samples} and {args.steps}")
    if args.noise_std < 0:
        raise CLIError(f"expected --noise-std >= 0, found {args.noise_std}")
    check_seed(args.seed)
    only = {"--mask": ("inpaint", args.mask), "--mask-kind": ("inpaint", args.mask_kind),
            "--factor": ("super_resolution", args.factor), "--blur-std": ("deblur", args.blur_std)}
    for option, (task, value) in only.items():
        if value is not None and args.task != task:
            raise CLIError(f"{option} applies to --task {task}, found --task {args.task}")
    if args.factor is not None and args.factor < 1:
        raise CLIError(f"expected --factor >= 1, found {args.factor}")
    if args.blur_std is not None and args.blur_std <= 0:
        raise CLIError(f"expected --blur-std > 0, found {args.blur_std}")
    if args.method in ("repaint", "imputation") and args.noise_std > 0 and not args.degrade:
        raise CLIError(f"--method {args.method} takes the observation as noise-free: --noise-std applies to pigdm, dps "
                       f"and replacement, or with --degrade (the noise added to the degraded image), found "
                       f"--noise-std {args.noise_std:g}")
    if args.method in ("repaint", "imputation") and args.sampler is not None:
        raise CLIError(f"--method {args.method} is a sampler itself: --sampler applies to pigdm, dps and replacement, "
                       f"found --sampler {args.sampler}")
    options = parse_options(args.options)
    if args.steps is not None and "num_steps" in options:
        raise CLIError("pass --steps or --option num_steps=..., not both")
    options.setdefault("num_steps", 100 if args.steps is None else args.steps)
    sampler = args.method if args.method in ("repaint", "imputation") else (args.sampler or "ancestral")
    return {"checkpoint": args.checkpoint, "image": os.fspath(args.image), "task": args.task, "mask": args.mask,
            "mask_kind": args.mask_kind, "factor": args.factor, "blur_std": args.blur_std, "method": args.method,
            "sampler": sampler, "sampler_options": options, "noise_std": args.noise_std, "degrade": args.degrade,
            "seed": args.seed, "num_samples": args.num_samples}


def _check_output_dir(outdir: Path, settings: dict, overwrite: bool) -> None:
    """Before any work: restore writes OUTPUT_FILES only. Files of those names are replaced with --overwrite or when
    manifest.json records the same settings (a re-run); otherwise they are refused (sample's rule)."""
    import json

    if outdir.exists() and not outdir.is_dir():
        raise CLIError(f"expected --output-dir to be a folder, found the file {outdir}")
    found = [name for name in OUTPUT_FILES if (outdir / name).exists()]
    if not found or overwrite:
        return
    try:
        old = json.loads((outdir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and all(old.get(k) == v for k, v in settings.items()):
        return
    what = "another restore run" if isinstance(old, dict) and "sampler_options" in old else "files restore did not write"
    raise CLIError(f"the folder {outdir} holds {what} ({', '.join(found)}): choose another --output-dir or pass "
                   f"--overwrite to replace {', '.join(OUTPUT_FILES)} (nothing else)")


def _run(args: argparse.Namespace) -> int:
    import torch

    from .._utils import per_sample_generators, sample_seed
    from ..conditioning import Downsample, GaussianBlur, Greyscale, Mask
    from ..pipeline import ScorePipeline, shipped_model_path
    from ..plotting import image_grid, save_png

    settings = _check_args(args)
    checkpoint = settings["checkpoint"] = args.checkpoint or str(shipped_model_path("digits"))
    outdir = Path(args.output_dir)
    _check_output_dir(outdir, settings, args.overwrite)
    with usage_checks():  # a missing or damaged model folder: exit code 2
        pipe = ScorePipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=not progress_enabled(args))  # the sampler's steps; none with -q
    shape = tuple(pipe.sample_shape)
    if len(shape) != 3:
        raise CLIError(f"restore needs an image model, found samples of shape {shape}")
    c, h, w = shape
    mask = None
    if args.task == "inpaint":
        if (args.mask is None) == (args.mask_kind is None):
            raise CLIError("inpaint: pass exactly one of --mask FILE or --mask-kind")
        if args.mask is not None:
            m = (_read_image(args.mask, 1) > 0).float()
            if tuple(m.shape) != (1, h, w):
                raise CLIError(f"inpaint: expected a mask of the model's size {h}x{w}, found {m.shape[1]}x{m.shape[2]}")
        else:
            m = _builtin_mask(args.mask_kind, h, w, args.seed)
        operator = mask = Mask(m)
    elif args.task == "super_resolution":
        operator = Downsample(2 if args.factor is None else args.factor)
    elif args.task == "colorize":
        if c != 3:
            raise CLIError(f"colorize needs a 3-channel model, this one has {c} channel(s)")
        operator = Greyscale()
    else:
        operator = GaussianBlur(1.0 if args.blur_std is None else args.blur_std)
    meas_shape = tuple(operator.measurement_shape(shape))
    if args.degrade:
        clean = _read_image(args.image, c)
        if tuple(clean.shape) != shape:
            raise CLIError(f"--degrade: expected an image of the model's size {shape}, found {tuple(clean.shape)}")
        g = torch.Generator().manual_seed(sample_seed(args.seed, 0, stream=1))  # not any restoration's stream
        y = operator(clean[None])[0]
        y = y + args.noise_std * torch.randn(y.shape, generator=g) * (operator(torch.ones(1, *shape))[0] != 0 if mask else 1)
    else:
        y = _read_image(args.image, meas_shape[0])
        if tuple(y.shape) != meas_shape:
            raise CLIError(f"{args.task}: expected an observation image of shape {meas_shape} (channels, height, width) "
                           f"for this model, found {tuple(y.shape)}")
        if mask is not None:
            y = operator(y[None])[0]
    y = y.to(pipe.unet.dtype)
    options = settings["sampler_options"]
    gens = per_sample_generators(args.seed, range(args.num_samples))  # sample i: (seed, i), as in sample
    kw = {"operator": operator, "observation": y}
    if args.method in ("repaint", "imputation"):
        out = pipe(args.num_samples, sampler=args.method, sampler_options=options, generator=gens, output_type="pt",
                   **kw)
    else:
        if args.method == "dps" and args.noise_std <= 0:
            raise CLIError("--method dps needs --noise-std > 0 (its likelihood weight is 1 / (2 noise_std^2))")
        out = pipe(args.num_samples, sampler=args.sampler or "ancestral", sampler_options=options, generator=gens,
                   output_type="pt", noise_std=args.noise_std, inverse_method=args.method, **kw)
    x = out.samples.detach().float().cpu()
    shown_obs = operator.pinv(y[None].float(), shape)  # the observation shown at the model's size
    picture = image_grid(torch.cat([shown_obs.clamp(-1, 1), x]), nrow=args.num_samples + 1)
    from safetensors.torch import save_file

    from .._io import atomic_write, write_json_atomic

    outdir.mkdir(parents=True, exist_ok=True)
    png = save_png(picture, outdir / "restored.png")
    atomic_write(outdir / "restored.safetensors",
                 lambda tmp: save_file({"samples": x.contiguous(), "observation": y.float().contiguous()}, tmp))
    write_json_atomic(outdir / MANIFEST, {**settings, "operator": repr(operator), "nfe": out.nfe})
    print(f"wrote {args.num_samples} restoration{'s' if args.num_samples > 1 else ''} ({args.task}, {args.method}, "
          f"{out.nfe} NFE):\n  {png}\n  {outdir / 'restored.safetensors'}\n  {outdir / MANIFEST} (the settings)")
    return 0
