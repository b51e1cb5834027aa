"""After training: samples of the trained model measured against the training data
(:func:`evaluate_samples`), a picture of them (:func:`sample_picture`), and the export of the run as a
Hub-style pipeline folder with its model card (:mod:`score_toolkit.hub`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .components import Components
from .data_stream import _mix

__all__ = ["evaluate_samples", "sample_picture"]


def evaluate_samples(comps: Components, model: torch.nn.Module, *, num_samples: int, sampler: str,
                     sampler_options: Mapping[str, Any], seed: int, device=None,
                     progress: bool = False) -> tuple[torch.Tensor, list[dict]]:
    """Draw ``num_samples`` samples of the trained ``model`` with a registered sampler and measure them
    against the training data: sliced Wasserstein-2 and energy distance, each with its noise floor (the
    same metric between two disjoint training subsets of the same size, when the data set is large
    enough), and the mode-weight error when the data's mixture is known. Returns ``(samples, results)``
    with results as the model card takes them (:func:`score_toolkit.hub.check_result`: type, name, value,
    optional floor, settings with the sampler, its options, the NFE, the number of samples and the seed).
    ``progress``: a progress bar over the sampler's steps (unless ``sampler_options`` sets ``progress`` itself)."""
    from .. import metrics
    from ..registry import get_sampler
    from ..scores import ScoreAdapter

    model = model.to(device) if device is not None else model
    net = model
    table = model.config.get("num_class_embeds") if hasattr(model, "config") else None
    if table is not None:  # a label-conditional UNet: its unconditional samples use the null label (the last row)
        def net(x, t):
            return model(x, t, class_labels=torch.full((x.shape[0],), int(table) - 1, dtype=torch.long,
                                                       device=x.device))
    score_fn = ScoreAdapter(net, comps.process, comps.prediction_type, comps.time_input)
    gens = torch.Generator(device=device or "cpu").manual_seed(_mix(seed, 0xE7A1))
    shape = (num_samples, *comps.dataset.sample_shape)
    out = get_sampler(sampler, **{"progress": progress, **dict(sampler_options)}).sample(score_fn, comps.process, shape=shape,
                                                                 generator=gens, device=device, dtype=torch.float32)
    samples = out.samples.detach().float().cpu()
    dataset = comps.dataset
    # reference samples drawn from the data (read now for image sets); the same draw as before for tensors
    ref = dataset.draw(num_samples, _mix(seed, 0xE7A2)).double()
    settings = {"sampler": sampler, "sampler_options": dict(sampler_options), "nfe": int(out.nfe),
                "num_samples": num_samples, "seed": seed}
    sw = metrics.sliced_wasserstein(samples.double().flatten(1), ref.flatten(1),
                                    generator=torch.Generator().manual_seed(_mix(seed, 0xE7A3)))
    ed = metrics.energy_distance(samples.double().flatten(1), ref.flatten(1))
    sw_result = {"name": f"sliced W2 to {len(ref)} training samples", "type": "sliced_wasserstein",
                 "value": round(float(sw), 5), "settings": settings}
    ed_result = {"name": f"energy distance to {len(ref)} training samples", "type": "energy_distance",
                 "value": round(float(ed), 5), "settings": settings}
    other = None
    if dataset.streaming or len(dataset) >= 2 * num_samples:
        other = dataset.draw(num_samples, _mix(seed, 0xE7A2), skip=num_samples).double()
        if len(other) < num_samples:  # a stream shorter than 2 num_samples
            other = None
    if other is not None:
        # the noise floors: two disjoint training subsets of the same size, judged the same way
        sw_result["floor"] = round(float(metrics.sliced_wasserstein(
            other.flatten(1), ref.flatten(1), generator=torch.Generator().manual_seed(_mix(seed, 0xE7A3)))), 5)
        ed_result["floor"] = round(float(metrics.energy_distance(other.flatten(1), ref.flatten(1))), 5)
    results = [sw_result, ed_result]
    if comps.dataset.mixture is not None:
        results.append({"name": "mode-weight error (TV) against the true mixture", "type": "mode_weight_error",
                        "value": round(float(metrics.mode_weight_error(samples.double(), comps.dataset.mixture)), 5),
                        "settings": settings})
    return samples, results


def sample_picture(comps: Components, samples: torch.Tensor):
    """A PIL picture of samples: an image grid for images (Pillow only), training data vs samples histograms for
    2-D points (matplotlib; without it no picture, with a warning). None for other shapes."""
    from .. import plotting as P

    if comps.dataset.is_image:
        n = min(len(samples), 64)
        return P.image_grid(samples[:n].clamp(-1, 1), nrow=int(math.ceil(math.sqrt(n))),
                            scale=4 if samples.shape[-1] >= 16 else 8)
    if samples.ndim == 2 and samples.shape[1] == 2:
        grid = P.figure_grid_or_warn(2, "the model card gets no sample picture")
        if grid is None:
            return None
        fig, axes = grid
        extent = comps.dataset.extent or (-6.0, 6.0, -6.0, 6.0)
        data = comps.dataset.head(max(len(samples), 1000))
        P.histogram_panel(data, extent, title=f"training data ({len(data)} points)", ax=axes[0])
        P.histogram_panel(samples, extent, title=f"model samples ({len(samples)})", ax=axes[1])
        return P.figure_to_image(fig)
    return None


def _commands(run_dir: Path, last: str | None) -> str | None:
    """Every command that worked on this run folder (a resumed run lists each invocation)."""
    path = run_dir / "commands.txt"
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()] if path.is_file() else []
    return "\n".join(lines) if lines else last


def _export_run(comps: Components, model, run_dir: Path, history, world: int, device) -> Path:

    from ..hub import export_pipeline

    cfg = comps.config
    folder = Path(cfg.export.folder) if cfg.export.folder else run_dir / "pipeline"
    samples, results = evaluate_samples(comps, model, num_samples=cfg.export.num_samples, sampler=cfg.export.sampler,
                                        sampler_options=cfg.export.sampler_options, seed=cfg.seed, device=device,
                                        progress=cfg.train.progress)
    final_loss = next((h["loss"] for h in reversed(history) if math.isfinite(h["loss"])), None)
    command = _commands(run_dir, cfg.export.command)
    if command:
        for r in results:  # measured at export, by the (last) training command
            r["command"] = command.strip().splitlines()[-1]
    card_info = build_card_info(comps, samples, results, command=command, num_processes=world,
                                final_loss=round(final_loss, 6) if final_loss is not None else None)
    return export_pipeline(model, comps.process, comps.prediction_type, comps.time_input, folder, card_info,
                           overwrite=cfg.export.overwrite)


def build_card_info(comps: Components, samples, results, *, command, final_loss, num_processes: int) -> dict:
    """The model-card fields of an export of ``comps``'s run (``hub.export_pipeline``'s ``card_info``), from the
    export's evaluation ``samples`` and ``results``; also used to re-render a shipped card (scripts/refresh_card.py)."""
    import yaml

    cfg = comps.config
    config_dict = cfg.to_dict()
    config_dict["export"] = {k: v for k, v in config_dict["export"].items() if k != "command"}
    return {
        "model_name": cfg.export.model_name or f"score-toolkit-{cfg.data.name}-{cfg.model.name.lower()}",
        "license": cfg.export.license,
        "dataset_name": comps.dataset.name,
        "dataset_description": comps.dataset.description,
        "dataset_id": comps.dataset.hub_id,
        "objective": f"{cfg.objective.name} {comps.objective!r}",
        "training_config_yaml": yaml.safe_dump(config_dict, sort_keys=False),
        "command": command,
        "results": results,
        "final_loss": final_loss,
        "sample_image": sample_picture(comps, samples),
        "sampler": f"{cfg.export.sampler} {dict(cfg.export.sampler_options)}",
        "num_processes": num_processes,
        "steps": cfg.train.steps,
        "sample_shape": list(comps.dataset.sample_shape),
    }
