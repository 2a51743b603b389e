"""Paired change of the held-out pass rate during RL runs: every scored step against the score
before the first update, problem by problem.

    python experiments/cispo/paired.py RUN/metrics.jsonl [RUN2/metrics.jsonl ...]

`xinzhou rl` keeps each held-out problem's outcome beside its pass rate (`outcomes`, 1 = solved),
so two scores of one run are over the same problems in the same order. A paired test is then far
tighter than two separate intervals: what counts is how many problems RL solved that the start
did not (fixed) against how many it lost (broken). p is the exact two-sided McNemar test of that
split (xinzhou.evals.sign_test). Prints a markdown table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from xinzhou.evals import paired_change, wilson  # noqa: E402


def rows(path: Path) -> list[dict]:
    scored = [r for r in map(json.loads, path.read_text().splitlines()) if "outcomes" in r]
    if not scored or scored[0]["step"] != -1:
        raise SystemExit(f"{path}: no held-out score before the first step with its outcomes "
                         "(a run of `xinzhou rl` that keeps them)")
    return scored


def table(paths: list[Path]) -> str:
    lines = ["| run | step | n | pass rate (95% CI) | change | fixed / broken | p |", "|---|---|---|---|---|---|---|"]
    for path in paths:
        scored = rows(path)
        start = scored[0]["outcomes"]
        for r in scored:
            n, k = len(r["outcomes"]), r["outcomes"].count("1")
            lo, hi = wilson(k, n)
            fixed, broken, p = paired_change(start, r["outcomes"])  # (raises if n differs)
            lines.append(f"| {path.parent.name} | {r['step'] + 1} | {n} | {k / n:.2%} ({lo:.1%}-{hi:.1%}) | "
                         f"{(fixed - broken) / n:+.2%} | {fixed} / {broken} | {p:.2g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    sys.stdout.write(table([Path(a) for a in sys.argv[1:]]))
