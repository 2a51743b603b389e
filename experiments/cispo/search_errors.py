"""Where a countdown (L3) search goes wrong. Runs a speedrun checkpoint on L3's held-out problems
(greedy, one engine batch, as the report scores them) and, for each written step `x op y = z` of
the thinking, checks z against x op y of the operands as written:

    Make 11 from 3 5 4  ->  <think>3+5=8 8+4=12:11 ... 15-4=11:11 yes</think>(3*5)-4

Prints L3, the first error of each failed search ("arithmetic": a step whose value is wrong;
"false yes": "yes" beside a value that is not the target; "missed hit": no "yes" beside a value
that is; "other": none of those, e.g. a right search with a wrong final expression), and how
often steps are wrong by operation and size ("2d": an operand of two digits or more, "big": the
true value is 100 or more).

    python experiments/cispo/search_errors.py runs/speedrun/sft/ckpt
"""

import argparse
import re
from collections import Counter

import torch

from xinzhou import evals, tasks
from xinzhou.hf import load_hf
from xinzhou.tasks import countdown
from xinzhou.tokenizer import Tokenizer

# a written step as countdown's "steps exact" reads it ("8*4=32"), then its check (":11 yes") if any
STEP = re.compile(countdown._STEP.pattern + r"(?::([0-9]{1,7}))?( yes)?")


def step_kind(x: int, op: str, y: int, value: int) -> str:
    return op + ("2d" if max(x, y) >= 10 else "1d") + (" big" if value >= 100 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--problems", type=int, default=200, help="held-out problems (the report scores 200)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_hf(args.ckpt).eval(), Tokenizer.load(args.ckpt)
    spec = tasks.LEVELS[3]
    samples = tasks.generate(spec.family, "test", args.problems, 0, **spec.params)
    with evals.local_client(model, tok) as client:
        answers = [evals.parsed(t) for t in evals.complete_all(client, samples)]
    wrong, written, causes = Counter(), Counter(), Counter()
    passed = 0
    for s, a in zip(samples, answers):
        first = None
        for m in STEP.finditer(a.reasoning):
            x, op, y, z, target, yes = m.groups()
            x, y, z = int(x), int(y), int(z)
            value = countdown._apply(x, op, y)
            kind = step_kind(x, op, y, value)
            written[kind] += 1
            if value != z:
                wrong[kind] += 1
                first = first or "arithmetic"
            if target is not None and (z == int(target)) != bool(yes):
                first = first or ("false yes" if yes else "missed hit")
        if tasks.verify(s, a):
            passed += 1
        else:
            causes[first or "other"] += 1
    print(f"L3 {passed / len(samples):.1%} of {len(samples)}; failed searches by first error: {dict(causes)}")
    for kind in sorted(written):
        print(f"  {kind:8s} {written[kind]:5d} steps written, {wrong[kind] / written[kind]:6.1%} wrong")


if __name__ == "__main__":
    main()
