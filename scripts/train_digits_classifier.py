#!/usr/bin/env python
"""Train the digits classifier that the digits Frechet distance uses, and write hub_cards/digits_classifier/.

Reproduces the shipped weights (deterministic on CPU with one thread):

    python scripts/train_digits_classifier.py                      # writes hub_cards/digits_classifier
    python scripts/train_digits_classifier.py --out /tmp/clf       # somewhere else

Data: scikit-learn's 1797 bundled 8x8 digits scaled to [-1, 1] (score_toolkit.data.load_digits); the first 80%
(indices 0..1436) train, the last 20% (1437..1796) are held out (score_toolkit.digits_classifier.held_out_indices).
Training: Adam (lr 2e-3, cosine decay to 0, weight decay 1e-4), batch 64, random shifts of up to one pixel in each
direction (background-padded), cross-entropy; the final epoch's weights are kept (no selection on the held-out set).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def shift_batch(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translations by -1, 0 or +1 pixel in each direction, padding with the background value -1."""
    b = x.shape[0]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (b,), generator=g)
    dy = torch.randint(0, 3, (b,), generator=g)
    out = torch.empty_like(x)
    for i in range(b):
        out[i] = padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "hub_cards" / "digits_classifier"))
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    from sklearn.datasets import load_digits as sk_load_digits

    from score_toolkit.data import load_digits
    from score_toolkit.digits_classifier import DigitsClassifier, held_out_indices, train_indices
    from score_toolkit.evaluation import DIGITS_HALVES, digits_floor

    images = load_digits().data
    targets = torch.as_tensor(sk_load_digits().target, dtype=torch.long)
    tr, ho = train_indices(len(images)), held_out_indices(len(images))
    x_tr, y_tr, x_ho, y_ho = images[tr], targets[tr], images[ho], targets[ho]
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = math.ceil(len(x_tr) / 64)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(shift_batch(x_tr[idx], g)), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            acc = float((model.predict(x_ho)[0] == y_ho).double().mean())
            print(f"epoch {epoch + 1}: loss {float(loss.detach()):.4f}, held-out accuracy {acc:.4f}", flush=True)
    model.eval()
    labels_ho = model.predict(x_ho)[0]
    labels_tr = model.predict(x_tr)[0]
    acc_ho = float((labels_ho == y_ho).double().mean())
    acc_tr = float((labels_tr == y_tr).double().mean())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import tempfile

    from score_toolkit._io import replace_files

    with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-", dir=out.parent) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        replace_files(tmp, out)  # each file replaced whole: an interrupted run leaves the shipped classifier loadable
    floor = digits_floor(model)
    n_params = sum(p.numel() for p in model.parameters())
    size_kb = (out / "diffusion_pytorch_model.safetensors").stat().st_size / 1024
    results = {"held_out_accuracy": round(acc_ho, 4), "held_out_errors": int((labels_ho != y_ho).sum()),
               "held_out_size": len(ho), "train_accuracy": round(acc_tr, 4),
               "frechet_floor_two_halves": round(floor["frechet_distance"], 4),
               "mean_confidence_real_digits_even_half": round(floor["mean_confidence"], 4),
               "parameters": n_params, "epochs": args.epochs, "seed": args.seed,
               "train_seconds": round(time.time() - start, 1)}
    print(json.dumps(results, indent=2))
    _card(results, DIGITS_HALVES, size_kb).save(str(out / "README.md"))
    return 0


def _card(r, halves: str, size_kb: float):
    """The model card, through huggingface_hub's ModelCard and the package's template
    (score_toolkit/templates/digits_classifier.md). The model-index holds the held-out accuracy only."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from score_toolkit.hub import TEMPLATES_DIR

    accuracy = EvalResult(task_type="image-classification", dataset_type="digits",
                          dataset_name="scikit-learn 8x8 digits, last 20% held out (indices 1437..1796)",
                          metric_type="accuracy", metric_value=r["held_out_accuracy"], metric_name="held-out accuracy",
                          metric_args={"num_images": r["held_out_size"]})
    data = ModelCardData(library_name="diffusers", pipeline_tag="image-classification", license="apache-2.0",
                         tags=["score-toolkit", "digits", "evaluation"], metrics=["accuracy"],
                         model_name="score-toolkit-digits-classifier", eval_results=[accuracy])
    return ModelCard.from_template(
        data, template_path=str(TEMPLATES_DIR / "digits_classifier.md"), model_name="score-toolkit digits classifier",
        parameters=f"{r['parameters']:,}", size_kb=f"{size_kb:.0f}", held_out_size=r["held_out_size"],
        held_out_accuracy=f"{r['held_out_accuracy']:.4f}", held_out_errors=r["held_out_errors"],
        train_accuracy=f"{r['train_accuracy']:.4f}", halves=halves, frechet_floor=f"{r['frechet_floor_two_halves']:.4f}",
        mean_confidence=f"{r['mean_confidence_real_digits_even_half']:.4f}", train_seconds=f"{r['train_seconds']:.0f}",
        epochs=r["epochs"], seed=r["seed"])


if __name__ == "__main__":
    sys.exit(main())
