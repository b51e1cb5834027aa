#!/usr/bin/env python
"""Inpainting held-out digits with the shipped digits model: our conditional methods and diffusers' RePaintPipeline
on the same network, side by side (docs/conditioning.md).

The 360 held-out digits of ``score_toolkit.digits_classifier.held_out_indices`` (8x8, [-1, 1]); half of the pixels
masked (``--mask left_half``, the default: one mask, so every method runs on the whole batch at once; or
``random_half``: a fixed random half per image, one image at a time). The digits model was trained on all 1797
digits: the held-out digits are held out from the classifier, not from the generative model. Methods: ``repaint`` (our sampler),
``imputation`` (score_sde's PC imputation, no corrector), ``replacement``, ``pigdm`` (noise_std 0.05, in model units)
and ``dps`` (noise_std 0.05), all with the ancestral grid of ``--steps`` steps on the model's DDPM process, and
diffusers' ``RePaintPipeline`` (``RePaintScheduler`` from the model's scheduler config) with the same
``--steps``, ``jump_length`` and ``jump_n_sample``. Reported: the shipped classifier's agreement with the true label
(and with the label it gives the clean digit), the RMS error on the observed and on the masked pixels, NFE and
wall time (one run each, interleaved; wall time is only comparable within the run).

    python benchmarks/bench_inpainting_digits.py               # writes benchmarks/results/inpainting_digits.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import git_commit  # noqa: E402

from score_toolkit.conditioning import Mask
from score_toolkit.data import load_digits
from score_toolkit.digits_classifier import held_out_indices, load_digits_classifier
from score_toolkit.pipeline import ScorePipeline, shipped_model_path


def masks(kind: str, n: int) -> torch.Tensor:
    m = torch.zeros(n, 1, 8, 8)
    if kind == "left_half":
        m[..., :4] = 1
    else:
        g = torch.Generator().manual_seed(0)
        for i in range(n):
            m.view(n, -1)[i, torch.randperm(64, generator=g)[:32]] = 1
    return m


def run_ours(pipe, method, x, m, args):
    """All images in one batch when they share the mask, else one at a time (an operator has one mask)."""
    n = x.shape[0]
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    y = x * m
    shared = bool((m == m[:1]).all())
    groups = [(0, n)] if shared else [(i, i + 1) for i in range(n)]
    outs, nfe = [], 0
    for a, b in groups:
        op = Mask(m[a])
        kw = dict(generator=gens[a:b], output_type="pt", num_steps=args.steps)
        if method in ("repaint", "imputation"):
            extra = {"jump_length": args.jump_length, "jump_n_sample": args.jump_n_sample} if method == "repaint" else {}
            r = pipe(b - a, sampler=method, operator=op, observation=y[a:b], **kw, **extra)
        else:
            r = pipe(b - a, sampler="ancestral", operator=op, observation=y[a:b],
                     noise_std=0.0 if method == "replacement" else 0.05, inverse_method=method, **kw)
        outs.append(r.samples)
        nfe = r.nfe
    return torch.cat(outs), nfe


def ancestral_step_factor(process, num_steps):
    """t -> the factor ``sigma_{t|s}^2 / alpha_{t|s}`` by which the ancestral step from t (a point of its grid) to the
    next grid time s multiplies the score, and the next time's alpha_s: a score term ``c(t) g`` moves ``x_s`` by
    ``factor * c(t) g``, so ``c(t) = w / factor`` makes the sampler apply a method's published update ``x_s += w g``."""
    from score_toolkit.samplers.ancestral import forward_transition

    ts = process.time_grid(num_steps, "uniform").tolist()
    table = [(t, *forward_transition(process, t, s)[4:], float(process.alpha(torch.tensor(s, dtype=torch.float64))))
             for t, s in zip(ts[:-1], ts[1:])]
    times = torch.tensor([r[0] for r in table], dtype=torch.float64)

    def lookup(t):
        i = (times[None] - t.double().reshape(-1, 1).cpu()).abs().argmin(1)
        a_ts = torch.tensor([float(table[k][1]) for k in i], dtype=torch.float64)
        var_ts = torch.tensor([float(table[k][2]) for k in i], dtype=torch.float64)
        alpha_s = torch.tensor([table[k][3] for k in i], dtype=torch.float64)
        return var_ts / a_ts, alpha_s

    return lookup


def run_published(pipe, method, x, m, args, zeta):
    """DPS and PiGDM with their published per-step updates, applied through the ancestral sampler's score term:
    DPS (Chung et al. 2023, the authors' code): ``x_s -= zeta' grad_{x_t} ||y - A x0^||`` per step (the step size
    ``zeta' / ||y - A x0^||`` of Algorithm 1 on the squared norm); PiGDM (Song et al. 2023, Algorithm 1):
    ``x_s += alpha_s r_t^2 g`` with ``g = (dx0^/dx_t)^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x0^)`` and
    ``r_t^2 = sigma~^2 / (1 + sigma~^2)`` (data variance 1), times ``zeta``."""
    from score_toolkit.conditioning import DPS, PiGDM
    from score_toolkit.registry import get_sampler
    from score_toolkit.scores import ScoreAdapter

    process, prediction_type, time_input = pipe.spec
    factor = ancestral_step_factor(process, args.steps)
    base = ScoreAdapter(pipe.unet, process, prediction_type, time_input)
    if not bool((m == m[:1]).all()):
        raise ValueError("the published-update variants run one shared mask (--mask left_half)")
    op, y = Mask(m[0]), x * m
    if method == "dps_published":
        def scale(t):
            f, _ = factor(t)
            return zeta / f
        score = DPS(base, process, op, y, 0.05, scale=scale, weighting="normalized")
    else:
        def scale(t):
            f, alpha_s = factor(t)
            a, s = process.marginal(t.double().cpu())
            nsr2 = (s / a) ** 2
            return zeta * alpha_s * (nsr2 / (1 + nsr2)) / f
        score = PiGDM(base, process, op, y, 0.05, scale=scale, data_variance=1.0)
    gens = [torch.Generator().manual_seed(i) for i in range(x.shape[0])]
    out = get_sampler("ancestral", num_steps=args.steps).sample(score, process, shape=tuple(x.shape), generator=gens)
    return out.samples.float(), out.nfe


def run_diffusers(pipe, x, m, args):
    from diffusers import RePaintPipeline, RePaintScheduler

    rp = RePaintPipeline(unet=pipe.unet, scheduler=RePaintScheduler.from_config(pipe.scheduler.config))
    rp.set_progress_bar_config(disable=True)
    outs = []
    calls = [0]
    orig = rp.unet.forward

    def counted(*a, **k):
        calls[0] += 1
        return orig(*a, **k)

    rp.unet.forward = counted
    shared = bool((m == m[:1]).all())
    groups = [(0, x.shape[0])] if shared else [(i, i + 1) for i in range(x.shape[0])]
    try:
        for a, b in groups:
            g = [torch.Generator().manual_seed(i) for i in range(a, b)]
            r = rp(image=x[a:b], mask_image=m[a:b], num_inference_steps=args.steps, jump_length=args.jump_length,
                   jump_n_sample=args.jump_n_sample, generator=g, output_type="np")
            outs.append(torch.from_numpy(r.images).permute(0, 3, 1, 2) * 2 - 1)  # [0, 1] -> [-1, 1]
    finally:
        rp.unet.forward = orig
    return torch.cat(outs).float(), calls[0] // len(groups)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=360, help="held-out digits to inpaint (default: all 360)")
    p.add_argument("--mask", choices=("left_half", "random_half"), default="left_half")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--jump-length", type=int, default=5)
    p.add_argument("--jump-n-sample", type=int, default=3)
    p.add_argument("--methods", default="repaint,diffusers_repaint,imputation,replacement,pigdm,dps",
                   help="comma-separated; also dps_published@ZETA and pigdm_published@ZETA (run_published)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="inpainting_digits", help="results file name (without .md)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start, load0 = time.time(), os.getloadavg()[0]
    commit = git_commit()
    data = load_digits()
    from sklearn.datasets import load_digits as sk

    labels_all = torch.from_numpy(sk().target)
    idx = held_out_indices()[: args.n]
    x, labels = data.data[idx].float(), labels_all[idx]
    m = masks(args.mask, x.shape[0])
    pipe = ScorePipeline.from_pretrained(str(shipped_model_path("digits")))
    clf = load_digits_classifier()
    clean_pred = clf.predict(x)[0]
    rows = []
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                if method == "diffusers_repaint":
                    out, nfe = run_diffusers(pipe, x, m, args)
                elif method.split("@")[0] in ("dps_published", "pigdm_published"):
                    name, zeta = method.split("@")
                    out, nfe = run_published(pipe, name, x, m, args, float(zeta))
                else:
                    out, nfe = run_ours(pipe, method, x, m, args)
        except Exception as exc:  # a diverging method is a result: recorded, not fatal
            row = {"method": method, "nfe": "-", "agree_true": float("nan"), "agree_clean": float("nan"),
                   "rmse_observed": float("nan"), "rmse_masked": float("nan"), "wall_s": time.perf_counter() - t0,
                   "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        wall = time.perf_counter() - t0
        pred = clf.predict(out.clamp(-1, 1))[0]
        err = (out - x) ** 2
        row = {"method": method, "nfe": nfe, "agree_true": float((pred == labels).float().mean()),
               "agree_clean": float((pred == clean_pred).float().mean()),
               "rmse_observed": float((err * m).sum().div(m.sum()).sqrt()),
               "rmse_masked": float((err * (1 - m)).sum().div((1 - m).sum()).sqrt()), "wall_s": wall}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = {"method": "masked input (no restoration, masked pixels 0)", "agree_true": float((clf.predict(x * m)[0] == labels).float().mean())}
    clean_acc = float((clean_pred == labels).float().mean())
    lines = ["# Inpainting held-out digits", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit `{commit}`, {x.shape[0]} held-out digits, mask "
             f"{args.mask}, {args.steps} steps, RePaint jump_length {args.jump_length}, jump_n_sample {args.jump_n_sample}, "
             f"threads {args.threads}, load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end, "
             f"{time.time() - start:.0f} s. Command: `python benchmarks/bench_inpainting_digits.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`.", "",
             f"Classifier accuracy on the clean digits: {clean_acc:.3f}; on the masked inputs (masked pixels set to 0): "
             f"{base['agree_true']:.3f}.", "",
             "| method | NFE per image | classifier = true label | classifier = its label of the clean digit | RMSE observed | RMSE masked | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['nfe']} | {r['agree_true']:.3f} | {r['agree_clean']:.3f} | {r['rmse_observed']:.3f} | "
                     f"{r['rmse_masked']:.3f} | {r['wall_s']:.0f} |")
    for r in rows:
        if "error" in r:
            lines.append(f"\n{r['method']}: {r['error']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{args.name}.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / f"{args.name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
