#!/usr/bin/env python
"""Re-render the model card (README.md and sample.png) of a shipped model folder with the current card code,
from its weights and its training config, without retraining.

    python scripts/refresh_card.py hub_cards/configs/digits.yaml      # rewrites hub_cards/digits/README.md, sample.png

What `score-toolkit train` does at export is redone exactly (score_toolkit.training.export): the export's
measurements are re-run with the config's sampler, options, number of samples and seed on the folder's weights,
and the folder is exported again into a temporary folder, whose weights, network config and scheduler config must
equal the shipped files byte for byte (else nothing is written). Two things only the training run knew are carried
over from the card being replaced: the training command it records and the final training loss (the old cards kept
it in their model-index). Measurements written later by `score-toolkit evaluate/likelihood --update-card` (results
that record their command) are written into the new card again; hand-written rows are not.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path


def _json(path: Path) -> dict:
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("_name_or_path", None)
    return data


def _old_card_record(card_path: Path) -> tuple[str, float | None, list]:
    from huggingface_hub import ModelCard

    card = ModelCard.load(card_path)
    match = re.search(r"Trained with exactly this command:\n\n```bash\n(.+?)\n```", card.text)
    if match is None:
        raise SystemExit(f"{card_path}: no recorded training command ('Trained with exactly this command:')")
    loss = re.search(r"Final training loss \(mean over the last log window\): ([0-9.eE+-]+)\.", card.text)
    final_loss = float(loss.group(1)) if loss else None
    later = []
    for r in card.data.eval_results or []:
        if r.metric_type == "training_loss":
            final_loss = float(r.metric_value)
        elif (r.metric_args or {}).get("command") and not r.metric_args["command"].startswith("score-toolkit train"):
            later.append(r)
    return match.group(1), final_loss, later


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="the training config whose export.folder is the shipped folder")
    args = p.parse_args(argv)

    import torch

    from score_toolkit._io import atomic_write
    from score_toolkit.hub import export_pipeline, load_pipeline_components, update_model_card
    from score_toolkit.training import build_components, evaluate_samples, load_config
    from score_toolkit.training.export import build_card_info

    torch.set_num_threads(1)
    cfg = load_config(args.config)
    folder = Path(cfg.export.folder)
    command, final_loss, later = _old_card_record(folder / "README.md")
    comps = build_components(cfg)
    model = load_pipeline_components(folder).model
    samples, results = evaluate_samples(comps, model, num_samples=cfg.export.num_samples, sampler=cfg.export.sampler,
                                        sampler_options=cfg.export.sampler_options, seed=cfg.seed)
    for r in results:
        r["command"] = command
    card_info = build_card_info(comps, samples, results, command=command, final_loss=final_loss, num_processes=1)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = export_pipeline(model, comps.process, comps.prediction_type, comps.time_input, Path(tmp) / "export",
                                card_info)
        for rel in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                    "scheduler/scheduler_config.json"):
            if rel.endswith(".json"):  # diffusers records where a loaded model came from: not part of the export
                same = _json(fresh / rel) == _json(folder / rel)
            else:
                same = filecmp.cmp(fresh / rel, folder / rel, shallow=False)
            if not same:
                raise SystemExit(f"{folder / rel} differs from a fresh export of the same weights: not refreshing")
        for name in ("README.md", "sample.png"):
            if (fresh / name).is_file():
                atomic_write(folder / name, lambda dst, src=fresh / name: shutil.copyfile(src, dst))
                print(f"wrote {folder / name}")
    if later:
        update_model_card(folder, [{"type": r.metric_type, "name": r.metric_name, "value": r.metric_value,
                                    "settings": {k: v for k, v in r.metric_args.items() if k != "command"},
                                    "command": r.metric_args["command"]} for r in later])
        print(f"kept {len(later)} later measurement(s) in {folder / 'README.md'}")
    for r in results:
        print(f"{r['name']}: {r['value']}" + (f" (noise floor {r['floor']})" if "floor" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
