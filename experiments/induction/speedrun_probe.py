"""Does copying form in the speedrun itself? The tiny speedrun reduced to L1 and L5: SFT on recall
and retrieval only (8,000 + 2,000 samples, 400 steps), pretraining optionally with copying
drills (xinzhou/tasks/drills.py) and more steps, scored on 50 held-out problems per level.

    python experiments/induction/speedrun_probe.py --optimizer muon --drills 6000 --pretrain-steps 300 --seed 2

Writes a speedrun directory (report.md, levels.json) under --out; about 4 minutes on 2 cores.
L1's report row gives its two kinds apart (repeat: copy a sequence; kv: read a key's value); the
last lines print whether the pretrained and the SFT model copy at all (copy_loss).
"""

import argparse
import dataclasses
from pathlib import Path

import torch

from xinzhou.cli import RECIPES, speedrun
from xinzhou.engine.logprobs import token_logprobs
from xinzhou.hf import load_hf
from xinzhou.tasks import drill_text, plain_lookup_text, recall
from xinzhou.tokenizer import Tokenizer

from run import parse_overrides  # experiments/induction/run.py


def copy_loss(ckpt: Path, tok: Tokenizer, n: int = 20) -> tuple[float, float]:
    """Mean loss (nats) on the first line of n held-out repeat drills, and on the copies after it:
    a model that copies from its context is near 0 on the copies, one that does not stays near
    the first line's loss."""
    model = load_hf(ckpt).eval()
    first, later = [], []
    for doc in drill_text(999, 2 * n)[0::2]:  # the repeat drills of a seed no run trains on
        ids = [tok.bos_id] + tok.encode(doc)  # documents start with BOS, as in training
        n1 = 1 + len(tok.encode(doc.split("\n")[0]))
        loss = -token_logprobs(model, ids)  # loss[i]: of ids[i + 1]
        first.append(loss[:n1 - 1].mean().item())
        later.append(loss[n1:].mean().item())
    return sum(first) / n, sum(later) / n


def lookup_accuracy(ckpt: Path, tok: Tokenizer, n: int = 40) -> tuple[float, float]:
    """Teacher-forced accuracy (argmax) on the first token of each asked value in n held-out lookup
    drills of each form: without a separator (plain_lookup_text: every key asked again; the first
    half of the questions, so that "a value not asked yet" is not enough) and with `=` (drill_text's
    "k? value" lines)."""
    model = load_hf(ckpt).eval()

    def score(pieces: list[tuple[str, bool]]) -> tuple[int, int]:
        ids, scored = [tok.bos_id], []
        for text, is_value in pieces:
            if is_value:
                scored.append(len(ids))
            ids += tok.encode(text)
        with torch.no_grad():
            pred = model(torch.tensor([ids]))[0].argmax(-1)
        return sum(int(pred[i - 1] == ids[i]) for i in scored), len(scored)

    plain = [0, 0]
    for doc in plain_lookup_text(999, n):
        listed, asked = doc.split("\n")
        words = asked.split()
        pairs = list(zip(words[0::2], words[1::2]))[:len(words) // 4]
        pieces = [(listed + "\n", False)]
        for i, (k, v) in enumerate(pairs):
            pieces += [((" " if i else "") + k, False), (" " + v, True)]
        a, b = score(pieces)
        plain = [plain[0] + a, plain[1] + b]
    sep = [0, 0]
    for doc in drill_text(999, 2 * n)[1::2]:  # the lookup drills
        listed, *lines = doc.split("\n")
        pieces = [(listed, False)]
        for line in lines:
            k, v = line.split("? ")
            pieces += [(f"\n{k}?", False), (" " + v, True)]
        a, b = score(pieces)
        sep = [sep[0] + a, sep[1] + b]
    return plain[0] / plain[1], sep[0] / sep[1]


def spaced_key_lookups() -> None:
    """--kv-spaced-query: L1's key lookups rewritten so that each key is the same token in the list
    and in the question. In L1's own form the list's keys are ' f' (space, letter: one token after
    the first pair) and the question's is 'f', two tokens the model must learn are the same key.
    Applies to the SFT samples and the held-out ones alike (both come from recall.generate)."""
    original = recall.generate

    def generate(*a, **k):
        out = []
        for s in original(*a, **k):
            if s.meta.get("kind") == "kv":
                pairs, question = s.messages[-1]["content"].split("\n")
                s = dataclasses.replace(s, messages=[{"role": "user", "content": f" {pairs}\n {question}"}])
            out.append(s)
        return out

    recall.generate = generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizer", choices=("adamw", "muon"), default="muon")
    ap.add_argument("--drills", type=int, default=6000, help="copying drills added to pretraining")
    ap.add_argument("--plain-lookups", type=int, default=0,
                    help="lookup drills without a separator added to pretraining (tasks.plain_lookup_text)")
    ap.add_argument("--plain-pairs", default="6,12",
                    help="LO,HI: pairs per plain lookup drill (Recipe.plain_lookup_pairs), in pretraining and the lookup stage")
    ap.add_argument("--lookup-steps", type=int, default=0,
                    help="a stage before pretraining on plain lookups only (Recipe.lookup_steps)")
    ap.add_argument("--lookup-drills", type=int, default=40000, help="its documents (Recipe.lookup_drills)")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--pretrain-docs", type=int, default=6000, help="task and filler documents in pretraining")
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--sft-lr", type=float, default=RECIPES["tiny"].sft_lr, help="AdamW rate of SFT")
    ap.add_argument("--sft-muon-lr", type=float, default=None, help="Muon rate of SFT (default: the recipe's)")
    ap.add_argument("--sft-mix", default="recall=8000,retrieval=2000",
                    help="family=samples,... ('full': the tiny recipe's five-level mix)")
    ap.add_argument("--sft-drills", type=int, default=0, help="copying drills kept in the SFT mix")
    ap.add_argument("--sft-plain-lookups", type=int, default=0,
                    help="plain lookup drills kept in the SFT mix (Recipe.sft_plain_lookups)")
    ap.add_argument("--sft-check-drills", type=int, default=0,
                    help="balanced countdown search checks in the SFT mix (Recipe.sft_check_drills)")
    ap.add_argument("--sft-key-checks", type=int, default=0,
                    help="balanced key checks in the SFT mix (Recipe.sft_key_checks, recall.check_drills)")
    ap.add_argument("--sft-key-scans", type=int, default=0,
                    help="whole key-check scans of a list in the SFT mix (Recipe.sft_key_scans, recall.scan_drills)")
    ap.add_argument("--kv-thinking", choices=("none", "scan", "pair", "check"), default="none",
                    help="the thinking of L1's key-lookup demonstrations (xinzhou/tasks/recall.py)")
    ap.add_argument("--retrieval-thinking", choices=("none", "fact"), default="none",
                    help="the thinking of L5's demonstrations (xinzhou/tasks/retrieval.py)")
    ap.add_argument("--kv-spaced-query", action="store_true",
                    help="key lookups (trained and held out) that write every key as one token form: ' f' "
                         "in the list and in the question (' c=ocean f=mango\\n f?'), where L1 writes 'f?'")
    ap.add_argument("--eval-n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-set", dest="model_set", action="append", default=[], metavar="FIELD=JSON",
                    help="override a field of the recipe's model, e.g. layer_types='[\"softmax\",\"softmax\"]'")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = dict(RECIPES["tiny"].model) | parse_overrides(args.model_set, "--model-set")
    if args.kv_spaced_query:
        spaced_key_lookups()
    mix = (RECIPES["tiny"].sft_mix if args.sft_mix == "full"
           else {k: int(v) for k, v in (part.split("=") for part in args.sft_mix.split(","))})
    r = dataclasses.replace(RECIPES["tiny"], model=model, optimizer=args.optimizer, pretrain_drills=args.drills,
                            pretrain_plain_lookups=args.plain_lookups, lookup_steps=args.lookup_steps,
                            lookup_drills=args.lookup_drills,
                            plain_lookup_pairs=tuple(int(x) for x in args.plain_pairs.split(",")),
                            pretrain_docs=args.pretrain_docs,
                            pretrain_steps=args.pretrain_steps, sft_mix=mix, sft_drills=args.sft_drills,
                            sft_plain_lookups=args.sft_plain_lookups,
                            sft_check_drills=args.sft_check_drills, sft_key_checks=args.sft_key_checks,
                            sft_key_scans=args.sft_key_scans,
                            sft_steps=args.sft_steps, sft_lr=args.sft_lr, sft_muon_lr=args.sft_muon_lr,
                            sft_task_params=({"recall": {"thinking": args.kv_thinking}} if "recall" in mix else {})
                            | ({"retrieval": {"thinking": args.retrieval_thinking}} if "retrieval" in mix else {}),
                            curve_points=0, eval_n=args.eval_n)
    out = args.out or f"runs/induction-probe/{args.optimizer}-docs{args.pretrain_docs}-drills{args.drills}-seed{args.seed}"
    speedrun(r, out, seed=args.seed, name="L1/L5 probe")
    tok = Tokenizer.load(Path(out) / "tokenizer" / "tokenizer.json")
    for stage in (("lookups",) if args.lookup_steps else ()) + ("pretrain", "sft"):
        a, b = copy_loss(Path(out) / stage / "ckpt", tok)
        plain, sep = lookup_accuracy(Path(out) / stage / "ckpt", tok)
        print(f"{stage}: loss on held-out repeat drills, first line {a:.2f}, later copies {b:.2f} nats; "
              f"lookup drills' values right (teacher-forced): without a separator {plain:.1%}, with '=' {sep:.1%}")


if __name__ == "__main__":
    main()
