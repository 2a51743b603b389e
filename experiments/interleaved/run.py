"""Does sending the model's earlier thinking back help? The MiniMax-M2 report measures tau^2 87 -> 64
when it is dropped. Here: a checkpoint served by `xinzhou serve`, held-out tool tasks solved
through the agent loop, with the thinking sent back and with it dropped, in one protocol at a
time. Success = the final answer equals the tool-derived answer. Reports both rates with n and
95% Wilson intervals.

    python experiments/interleaved/run.py --model runs/speedrun/sft/ckpt --n 200 --out experiments/interleaved
    python experiments/interleaved/run.py --model runs/speedrun/sft/ckpt --kinds total --finetune 300 \
        --n 200 --out experiments/interleaved          # multi-step: two prices, their sum, the answer

--kinds total asks multi-step questions (tasks.tools "total": two get_price calls in one turn,
then the calculator on their results, then the answer: three model turns). --finetune N first
fine-tunes the checkpoint for N steps on training questions of --kinds (with the thinking of
every turn in the loop, as generated), since the speedrun's mix has only one-call questions.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import uvicorn  # noqa: E402

from xinzhou import tasks  # noqa: E402
from xinzhou.agent import loop  # noqa: E402
from xinzhou.agent.client import make_client  # noqa: E402
from xinzhou.agent.tools import GetPrice, TaskCalculator  # noqa: E402
from xinzhou.evals import wilson  # noqa: E402
from xinzhou.server.app import create_app, load_worker  # noqa: E402
from xinzhou.tasks.tools import KINDS, PRICES  # noqa: E402


def finetune(ckpt: str, kinds: tuple[str, ...], steps: int, out: Path) -> Path:
    """SFT of the checkpoint on training questions of `kinds` (mixed with one-call ones, so the
    old skill stays), every turn's thinking kept as generated; returns the new checkpoint."""
    from xinzhou.data import tokenize_docs, write_shards
    from xinzhou.tokenizer import Tokenizer
    from xinzhou.train import TrainConfig, train

    samples = tasks.generate("tools", "train", 4000, 1, kinds=kinds) + tasks.generate("tools", "train", 1000, 2)
    convs = [dict(messages=tasks.conversation(s), tools=s.tools, keep_all_thinking=True) for s in samples]
    tok = Tokenizer.load(Path(ckpt) / "tokenizer.json")
    shards = out / "finetune-data"
    write_shards(tokenize_docs(convs, tok), shards, tok.vocab_size, "tools " + "+".join(kinds))
    return train(None, TrainConfig(data=str(shards), out_dir=str(out / "finetune"), steps=steps, lr=1e-3,
                                  init_from=ckpt, warmup_steps=10, seq_len=512, batch_size=8,
                                  tokenizer=str(Path(ckpt) / "tokenizer.json")))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--protocol", default="openai", choices=["openai", "responses", "anthropic"])
    p.add_argument("--out", required=True)
    p.add_argument("--kinds", nargs="+", default=["calculator", "get_price"], choices=list(KINDS))
    p.add_argument("--finetune", type=int, default=0, help="SFT steps on --kinds training questions first")
    p.add_argument("--max-steps", type=int, default=4, help="model calls per task")
    args = p.parse_args()
    model = finetune(args.model, tuple(args.kinds), args.finetune, Path(args.out)) if args.finetune else args.model
    worker = load_worker(model, max_batch=16)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = uvicorn.Server(uvicorn.Config(create_app(worker, "xz"), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    tools = {t.name: t for t in (TaskCalculator(), GetPrice(PRICES))}
    samples = tasks.generate("tools", "test", args.n, 0, kinds=tuple(args.kinds))
    results = {}
    for keep in (True, False):
        client = make_client(args.protocol, f"http://127.0.0.1:{port}", "xz", temperature=0.0, max_tokens=96,
                             keep_thinking=keep)
        t0 = time.time()

        def solved(smp: tasks.Sample) -> bool:
            final = [e for e in loop.run(client, smp.messages[0]["content"], tools, max_steps=args.max_steps)
                     if isinstance(e, loop.Final)]
            return bool(final) and final[0].content.strip() == smp.answer

        with ThreadPoolExecutor(max_workers=16) as pool:  # the server batches concurrent tasks
            ok = sum(pool.map(solved, samples))
        lo, hi = wilson(ok, len(samples))
        results["kept" if keep else "dropped"] = dict(success=ok / len(samples), n=len(samples), ci95=[lo, hi],
                                                      seconds=round(time.time() - t0, 1))
        print(("kept   " if keep else "dropped"), f"{ok}/{len(samples)} = {ok / len(samples):.1%} "
              f"(95% CI {lo:.1%}-{hi:.1%})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results["setup"] = dict(model=str(args.model), kinds=args.kinds, finetune_steps=args.finetune, n=args.n,
                            protocol=args.protocol, max_steps=args.max_steps)
    name = f"results-{args.protocol}" + ("" if args.kinds == ["calculator", "get_price"] else "-" + "-".join(args.kinds))
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    server.should_exit = True
    worker.close()


if __name__ == "__main__":
    main()
