"""What an L5 (retrieval) answer got wrong. Runs a speedrun checkpoint on L5's held-out problems
(greedy, one engine batch, as the report scores them) and sorts each answer:

- right: the asked code;
- a decoy's code: the whole code of another fact of the haystack (the wrong fact, copied right);
- partly the asked code / partly a decoy's: four digits, at least two of them in place;
- other: anything else (a code of no fact, no code at all).

With `thinking="fact"` demonstrations (`<think> The code of Hiro is 4821.</think>4821`) it also
sorts the written fact: its name (the asked one, a decoy's, a name not in the haystack), its code
(that name's, another fact's, no fact's) and whether the answer repeats it.

    python experiments/induction/retrieval_errors.py runs/speedrun --length 200

Prints the counts; `--length` scores other haystack lengths than L5's 200 words.
"""

import argparse
import re
from collections import Counter
from pathlib import Path

import torch

from xinzhou import evals, tasks
from xinzhou.hf import load_hf
from xinzhou.tokenizer import Tokenizer

FACT = re.compile(r"The code of (\w+) is (\d+)\.")


def answer_kind(answer: str, asked: str, decoys: list[str]) -> str:
    def close(a: str, b: str) -> bool:
        return len(a) == len(b) == 4 and sum(x == y for x, y in zip(a, b)) >= 2

    if answer == asked:
        return "right"
    if answer in decoys:
        return "a decoy's code"
    if close(answer, asked):
        return "partly the asked code"
    return "partly a decoy's code" if any(close(answer, d) for d in decoys) else "other"


def fact_kinds(reasoning: str, content: str, asked: str, facts: dict[str, str]) -> list[str]:
    m = FACT.fullmatch(reasoning.strip())
    if not m:
        return ["thinking: no fact"]
    name, code = m.groups()
    out = ["name: " + ("asked" if name == asked else "a decoy's" if name in facts else "not in the haystack")]
    if name in facts:
        out.append("code: " + ("that name's" if facts[name] == code
                               else "another fact's" if code in facts.values() else "no fact's"))
    out.append("answer " + ("repeats" if content.strip() == code else "differs from") + " the thought code")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a speedrun directory (its sft/ckpt is used)")
    ap.add_argument("--problems", type=int, default=200, help="held-out problems (the report scores 200)")
    ap.add_argument("--length", type=int, default=tasks.LEVELS[5].params["length"], help="haystack words")
    ap.add_argument("--seed", type=int, default=0, help="the held-out draw (the report's is 0)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = args.run / "sft" / "ckpt"
    model, tok = load_hf(ckpt).eval(), Tokenizer.load(ckpt)
    samples = tasks.generate("retrieval", "test", args.problems, args.seed, length=args.length)
    with evals.local_client(model, tok) as client:
        answers = [evals.parsed(t) for t in evals.complete_all(client, samples)]
    kinds, thoughts = Counter(), Counter()
    for s, a in zip(samples, answers):
        facts = dict(FACT.findall(s.messages[-1]["content"]))
        asked = s.meta["name"]
        kinds[answer_kind(a.content.strip(), facts[asked], [c for n, c in facts.items() if n != asked])] += 1
        if a.reasoning.strip():
            thoughts.update(fact_kinds(a.reasoning, a.content, asked, facts))
    print(f"L5 problems at {args.length} words: {len(samples)}")
    for k, v in kinds.most_common():
        print(f"  {k}: {v}")
    if thoughts:
        print("written facts:")
        for k, v in sorted(thoughts.items()):
            print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
