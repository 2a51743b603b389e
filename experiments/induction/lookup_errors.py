"""Where a key lookup's "check" thinking goes wrong. Runs a speedrun checkpoint on L1's held-out key
lookups (greedy, one engine batch) and sorts each answer by the first check of its thinking that
differs from the reference scan (xinzhou/tasks/recall.py, thinking="check"):

    c=ocean f=mango a=lemon\\nf?  ->  <think> c: f no=ocean f: f yes=mango</think>mango

- key copy wrong: a check's first key is not the list's next key (and whether it is the asked key);
- asked key wrong, verdict wrong (yes on different keys / no on equal ones), value copy wrong;
- stopped without yes, answer != the yes value: the scan was right and the end was not.

    python experiments/induction/lookup_errors.py runs/speedrun --problems 400

Prints counts of passed and failed answers by that first error ("clean": none).
"""

import argparse
import re
from collections import Counter
from pathlib import Path

import torch

from xinzhou import evals, tasks
from xinzhou.hf import load_hf
from xinzhou.tasks import recall
from xinzhou.tokenizer import Tokenizer

CHECK = re.compile(r" ?(\w+): (\w+) (yes|no)=(\w+)")


def first_error(prompt: str, reasoning: str, content: str) -> str:
    pairs_text, asked = recall._parts(prompt)
    pairs = [kv.split("=") for kv in pairs_text.split()]
    checks = CHECK.findall(reasoning)
    for i, (key, written_asked, verdict, value) in enumerate(checks):
        if i >= len(pairs):
            return "ran past the list"
        if key != pairs[i][0]:
            return "key copy wrong" + (" (wrote the asked key)" if key == asked else "")
        if written_asked != asked:
            return "asked key wrong"
        if (verdict == "yes") != (key == asked):
            return f"verdict wrong ({verdict} on {'equal' if key == asked else 'different'} keys)"
        if value != pairs[i][1]:
            return "value copy wrong"
        if verdict == "yes":
            break
    if not checks or checks[-1][2] != "yes":
        return "stopped without yes"
    if content.strip() != checks[-1][3]:
        return "answer != the yes value"
    return "clean"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a speedrun directory (its sft/ckpt is used)")
    ap.add_argument("--problems", type=int, default=400, help="L1 held-out problems drawn (about half are lookups)")
    ap.add_argument("--seed", type=int, default=0, help="the held-out draw (the report's is 0)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = args.run / "sft" / "ckpt"
    model, tok = load_hf(ckpt).eval(), Tokenizer.load(ckpt)
    samples = [s for s in tasks.generate("recall", "test", args.problems, args.seed) if s.meta["kind"] == "kv"]
    with evals.local_client(model, tok) as client:
        outs = evals.complete_all(client, samples)
    counts = Counter()
    for s, out in zip(samples, outs):
        ok = tasks.verify(s, evals.parsed(out))  # as the report scores it
        counts[("pass" if ok else "fail", first_error(s.messages[-1]["content"], out.reasoning, out.content))] += 1
    passed = sum(v for (k, _), v in counts.items() if k == "pass")
    print(f"{args.run}: {passed} of {len(samples)} key lookups right ({passed / len(samples):.1%})")
    for (verdict, err), v in counts.most_common():
        print(f"  {v:4d}  {verdict}  {err}")


if __name__ == "__main__":
    main()
