"""CISPO vs DAPO vs GRPO at the same compute, on countdown (L3), from one SFT checkpoint.

    python experiments/cispo/base.py --out runs/cispo-base          # the SFT checkpoint to start from
    python experiments/cispo/run.py --base runs/cispo-base/sft/ckpt --out runs/cispo
    python experiments/cispo/run.py --base ... --out ... --report-only    # redo the tables and plots

Every run: the same prompts per step, the same group size, `--updates` minibatch updates per
rollout batch (the regime where the losses differ: with one update the ratio is 1 and all three
give the same gradient), the same steps, three seeds each. Reported: the held-out pass rate curve,
steps to reach fixed pass rates, the DAPO/CISPO step ratio (MiniMax-M1 reports about 2x),
clip fractions, entropy, response length, and ScaleRL's sigmoid
R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B) fitted to each mean curve (C = rollouts so far).
Writes OUT/results.md, OUT/results.json and OUT/curves.png; whatever the outcome, it is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from xinzhou.rl_train import RLConfig, rl_train  # noqa: E402

LOSSES = ("grpo", "dapo", "cispo")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(rows: list[dict]) -> tuple[list[int], list[float]]:
    """(steps completed, held-out pass rate) including the start (step -1 row = 0 steps)."""
    pts = [(r["step"] + 1, r["pass_rate"]) for r in rows if "pass_rate" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def fit_sigmoid(c: np.ndarray, r: np.ndarray) -> dict | None:
    """Least squares of ScaleRL's curve: for fixed (C_mid, B) the curve is linear in (R0, A), so a
    grid over C_mid and B with a closed-form inner solve finds the global fit."""
    keep = c > 0
    c, r = c[keep], r[keep]
    if len(c) < 3:
        return None
    best = None
    for c_mid in np.geomspace(c.min() / 4, c.max() * 8, 80):
        for b in np.linspace(0.3, 4.0, 38):
            s = 1.0 / (1.0 + (c_mid / c) ** b)
            X = np.stack([1 - s, s], 1)
            (r0, a), *_ = np.linalg.lstsq(X, r, rcond=None)
            err = float(((X @ np.array([r0, a]) - r) ** 2).sum())
            if best is None or err < best["sse"]:
                best = dict(R0=float(r0), A=float(a), C_mid=float(c_mid), B=float(b), sse=err)
    return best


def steps_to(steps: list[int], rates: list[float], level: float) -> int | None:
    return next((s for s, v in zip(steps, rates) if v >= level), None)


def report(out: Path, runs: dict, rollouts_per_step: int, eval_n: int) -> None:
    res: dict = {"runs": {}, "by_loss": {}}
    base = [curve(read_rows(out / name / "metrics.jsonl"))[1][0] for name in runs]
    start = float(np.mean(base))
    levels = [round(start + d, 3) for d in (0.05, 0.10, 0.20)]
    for loss in LOSSES:
        names = [n for n, (lo, _) in runs.items() if lo == loss]
        curves, extras = [], {"clip_fraction": [], "entropy": [], "response_len": [], "repetition_rate": []}
        for n in names:
            rows = read_rows(out / n / "metrics.jsonl")
            s, v = curve(rows)
            curves.append((s, v))
            for k in extras:
                vals = [r[k] for r in rows if k in r and isinstance(r[k], (int, float)) and not math.isnan(r[k])]
                extras[k].append(float(np.mean(vals)) if vals else float("nan"))
            res["runs"][n] = dict(loss=loss, steps=s, pass_rate=v,
                                  steps_to={str(lv): steps_to(s, v, lv) for lv in levels})
        steps = curves[0][0]
        mat = np.array([v for _, v in curves])
        mean, sd = mat.mean(0), mat.std(0, ddof=1) if len(curves) > 1 else np.zeros(mat.shape[1])
        fit = fit_sigmoid(np.array(steps, float) * rollouts_per_step, mean)
        res["by_loss"][loss] = dict(
            steps=steps, mean=mean.tolist(), sd=sd.tolist(), seeds=len(curves), final_mean=float(mean[-1]),
            final_sd=float(sd[-1]), steps_to={str(lv): [res["runs"][n]["steps_to"][str(lv)] for n in names]
                                             for lv in levels},
            **{k: (float(np.nanmean(v)), float(np.nanstd(v))) for k, v in extras.items()}, sigmoid=fit)
    res["levels"] = levels
    res["start_pass_rate"] = start
    (out / "results.json").write_text(json.dumps(res, indent=2))

    lines = ["# CISPO vs DAPO vs GRPO on countdown (L3)", "",
             f"Start (SFT checkpoint): held-out pass rate {start:.1%}. {len(runs) // len(LOSSES)} seeds per loss; "
             f"{rollouts_per_step} rollouts per step.", "",
             "| loss | final pass rate (mean +- sd over seeds) | " + " | ".join(f"steps to {lv:.1%}" for lv in levels)
             + " | clip fraction | entropy | response length | sigmoid A / C_mid / B |",
             "|---|---|" + "---|" * len(levels) + "---|---|---|---|"]
    for loss, b in res["by_loss"].items():
        st = " | ".join(", ".join("-" if x is None else str(x) for x in b["steps_to"][str(lv)]) for lv in levels)
        fit = b["sigmoid"]
        fs = f"{fit['A']:.2f} / {fit['C_mid']:.0f} / {fit['B']:.2f}" if fit else "-"
        sd = f"{b['final_sd']:.1%}" if b["seeds"] > 1 else "n/a (1 seed)"
        lines.append(f"| {loss} | {b['final_mean']:.1%} +- {sd} | {st} | "
                     f"{b['clip_fraction'][0]:.3f} | {b['entropy'][0]:.3f} | {b['response_len'][0]:.1f} | {fs} |")
    ratios = []
    for lv in levels:
        d = [x for x in res["by_loss"]["dapo"]["steps_to"][str(lv)] if x is not None]
        c = [x for x in res["by_loss"]["cispo"]["steps_to"][str(lv)] if x is not None]
        if d and c and len(d) == len(c) == len(res["by_loss"]["dapo"]["steps_to"][str(lv)]):
            ratios.append(f"{lv:.1%}: {np.mean(d) / np.mean(c):.2f}")
        else:
            ratios.append(f"{lv:.1%}: n/a (not every seed reached it: dapo {len(d)}, cispo {len(c)})")
    lines += ["", "DAPO/CISPO step ratio (mean steps to reach each pass rate): " + "; ".join(ratios) + ".",
              "", f"Each pass rate is measured on n = {eval_n} held-out problems (95% Wilson half-width about "
              f"{1.96 * math.sqrt(start * (1 - start) / eval_n):.1%} at the start)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for loss, b in res["by_loss"].items():
        s, m, sd = np.array(b["steps"]), np.array(b["mean"]), np.array(b["sd"])
        ax.plot(s, m, "o-", label=f"{loss} (n={b['seeds']})")
        ax.fill_between(s, m - sd, m + sd, alpha=0.2)
    ax.set(xlabel="RL step", ylabel="held-out pass rate (L3 countdown)", title="same compute per step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True, help="SFT checkpoint (with tokenizer.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--updates", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    runs = {f"{loss}-s{seed}": (loss, seed) for loss in LOSSES for seed in range(args.seeds)}
    t0 = time.time()
    if not args.report_only:
        for name, (loss, seed) in runs.items():
            t = time.time()
            rl_train(RLConfig(model=args.base, out_dir=str(out / name), task="countdown", loss=loss, seed=seed,
                              steps=args.steps, prompts_per_step=args.prompts, group_size=args.group,
                              updates_per_step=args.updates, lr=args.lr, eval_every=args.eval_every,
                              eval_n=args.eval_n, progress=False))
            print(f"{name}: {time.time() - t:.0f} s", flush=True)
    report(out, runs, args.prompts * args.group, args.eval_n)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
