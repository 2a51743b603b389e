"""Does averaging the SFT weights make the tiny speedrun's levels steadier? A speedrun (the tiny
recipe, or it with the changes given) that also keeps exponential moving averages of the
parameters over the second half of SFT, at several decays, and scores each average on the same
held-out problems as the speedrun's own checkpoint.

    python experiments/averaging/ema.py --seed 1 --out runs/ema-s1

The speedrun itself is unchanged (the averages are taken in train()'s on_step hook, which leaves
training as it is), so OUT/report.md is the plain speedrun's report; each average is written to
OUT/ema-DECAY/ckpt with its report in OUT/ema-DECAY/. Prints one line per checkpoint.
"""

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import torch

from xinzhou import cli
from xinzhou.cli import RECIPES, report, speedrun
from xinzhou.hf import load_hf, save_hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--decays", default="0.99,0.995,0.998")
    ap.add_argument("--start", type=float, default=0.5, help="fraction of SFT after which averaging starts")
    ap.add_argument("--sft-task-params", default=None, help="JSON replacing the recipe's sft_task_params")
    args = ap.parse_args()
    decays = [float(d) for d in args.decays.split(",")]
    r = RECIPES["tiny"]
    if args.sft_task_params:
        params = {k: {p: tuple(v) if isinstance(v, list) else v for p, v in d.items()}
                  for k, d in json.loads(args.sft_task_params).items()}
        r = dataclasses.replace(r, sft_task_params=params)
    first = int(r.sft_steps * args.start)
    averages: dict[float, dict[str, torch.Tensor]] = {}
    plain_train = cli.train

    def train(model_cfg, cfg, on_step=None):
        if Path(cfg.out_dir).name != "sft":
            return plain_train(model_cfg, cfg, on_step)

        def hook(step, model):
            if on_step is not None:
                on_step(step, model)
            if step < first:
                return
            for d in decays:
                if d not in averages:
                    averages[d] = {k: p.detach().clone() for k, p in model.named_parameters()}
                else:
                    for k, p in model.named_parameters():
                        averages[d][k].lerp_(p.detach(), 1 - d)

        return plain_train(model_cfg, cfg, hook)

    cli.train = train
    out = Path(args.out)
    speedrun(r, str(out), seed=args.seed)
    ckpt = out / "sft" / "ckpt"
    rows = [("sft", json.loads((out / "levels.json").read_text()))]
    for d in decays:
        model = load_hf(ckpt)
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(averages[d][k])
        dest = out / f"ema-{d}"
        save_hf(model, dest / "ckpt")
        shutil.copy(ckpt / "tokenizer.json", dest / "ckpt" / "tokenizer.json")
        report(dest / "ckpt", dest, n=r.eval_n)
        rows.append((f"ema {d}", json.loads((dest / "levels.json").read_text())))
    for name, levels in rows:
        print(f"{name:>10}: " + " ".join(f"L{x['level']} {x['score']:.1%}" for x in levels), flush=True)


if __name__ == "__main__":
    main()
