"""Does sending the model's earlier thinking back help? The MiniMax-M2 report measures tau^2 87 -> 64
when it is dropped. Here: the speedrun checkpoint served by `xinzhou serve`, held-out L4 tool
tasks solved through the agent loop (call -> real result -> answer), with the thinking sent back
and with it dropped, in one protocol at a time. Success = the final answer equals the tool-derived
answer. Reports both rates with n and 95% Wilson intervals.

    python experiments/interleaved/run.py --model runs/speedrun/sft/ckpt --n 200 --out experiments/interleaved
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import uvicorn  # noqa: E402

from xinzhou import tasks  # noqa: E402
from xinzhou.agent import loop  # noqa: E402
from xinzhou.agent.client import make_client  # noqa: E402
from xinzhou.agent.tools import GetPrice, TaskCalculator  # noqa: E402
from xinzhou.evals import wilson  # noqa: E402
from xinzhou.server.app import create_app, load_worker  # noqa: E402
from xinzhou.tasks.tools import PRICES  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--protocol", default="openai", choices=["openai", "responses", "anthropic"])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    worker = load_worker(args.model, max_batch=16)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = uvicorn.Server(uvicorn.Config(create_app(worker, "xz"), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    tools = {t.name: t for t in (TaskCalculator(), GetPrice(PRICES))}
    samples = tasks.generate("tools", "test", args.n, 0)
    results = {}
    for keep in (True, False):
        client = make_client(args.protocol, f"http://127.0.0.1:{port}", "xz", temperature=0.0, max_tokens=96,
                             keep_thinking=keep)
        ok = 0
        t0 = time.time()
        for smp in samples:
            final = [e for e in loop.run(client, smp.messages[0]["content"], tools, max_steps=3)
                     if isinstance(e, loop.Final)]
            ok += bool(final) and final[0].content.strip() == smp.answer
        lo, hi = wilson(ok, len(samples))
        results["kept" if keep else "dropped"] = dict(success=ok / len(samples), n=len(samples), ci95=[lo, hi],
                                                      seconds=round(time.time() - t0, 1))
        print(("kept   " if keep else "dropped"), f"{ok}/{len(samples)} = {ok / len(samples):.1%} "
              f"(95% CI {lo:.1%}-{hi:.1%})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results-{args.protocol}.json").write_text(json.dumps(results, indent=2))
    server.should_exit = True
    worker.close()


if __name__ == "__main__":
    main()
