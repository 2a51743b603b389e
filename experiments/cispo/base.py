"""The base checkpoint of the CISPO experiment: the tiny speedrun with its SFT mix shifted to
countdown (L3), so that RL starts from a policy that already solves some problems (the default
speedrun's L3 of about 1% leaves next to no reward to learn from).

    python experiments/cispo/base.py --out runs/cispo-base      # then --base runs/cispo-base/sft/ckpt

About 8 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from xinzhou.cli import RECIPES, speedrun  # noqa: E402

COUNTDOWN_MIX = dict(countdown=20000, arithmetic=2000, tools=600, recall=200, retrieval=50)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    recipe = dataclasses.replace(RECIPES["tiny"], sft_mix=COUNTDOWN_MIX, sft_steps=700, curve_points=0)
    speedrun(recipe, out=args.out, seed=args.seed, name="tiny, countdown SFT mix (CISPO experiment base)")


if __name__ == "__main__":
    main()
