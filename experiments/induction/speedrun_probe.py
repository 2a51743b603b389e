"""Does copying form in the speedrun itself? The tiny speedrun reduced to L1 and L5: SFT on recall
and retrieval only (8,000 + 2,000 samples, 400 steps), pretraining optionally with copying
drills (xinzhou/tasks/drills.py) and more steps, scored on 50 held-out problems per level.

    python experiments/induction/speedrun_probe.py --optimizer muon --drills 6000 --pretrain-steps 300 --seed 2

Writes a speedrun directory (report.md, levels.json) under --out; about 4 minutes on 2 cores.
L1's report row gives its two kinds apart (repeat: copy a sequence; kv: read a key's value).
"""

import argparse
import dataclasses

from xinzhou.cli import RECIPES, speedrun


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizer", choices=("adamw", "muon"), default="muon")
    ap.add_argument("--drills", type=int, default=6000, help="copying drills added to pretraining")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    r = dataclasses.replace(RECIPES["tiny"], optimizer=args.optimizer, pretrain_drills=args.drills,
                            pretrain_steps=args.pretrain_steps, sft_mix=dict(recall=8000, retrieval=2000),
                            sft_steps=args.sft_steps, curve_points=0, eval_n=50)
    out = args.out or f"runs/induction-probe/{args.optimizer}-drills{args.drills}-seed{args.seed}"
    speedrun(r, out, seed=args.seed, name="L1/L5 probe")


if __name__ == "__main__":
    main()
