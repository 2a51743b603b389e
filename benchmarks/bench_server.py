"""Server overhead: `xinzhou serve` over HTTP vs the engine alone, same checkpoint, same prompts.

The server runs as its own process (`python -m xinzhou serve`) on loopback; C clients (C = 1, 16,
64) each stream one Chat Completions request (greedy, max_tokens=`new`) at once, and the client
records the time to its first delta and the usage the server reports. The engine alone gets the
very same prompt ids (the chat format's rendering of the same message) and SamplingParams in one
`Engine` in this process, all C requests added at once. Both are greedy over the same weights, so
both produce the same tokens; the benchmark checks that the token counts agree.

Reported per C: completion tokens/s and requests/s of each, the median time to first token, and
the ratios server / engine (the cost of HTTP, JSON, SSE and the chat-format parser). The model is
a random-weight hybrid of the engine benchmark's CPU shape (or `--model DIR`, a checkpoint with a
tokenizer); its tokenizer is trained here on task text when none is given.

    python benchmarks/bench_server.py --out bench_server.json          # CUDA if present, else CPU
    python benchmarks/bench_server.py --smoke --out /tmp/smoke.json    # tiny shapes: every path
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from timing import git_commit  # benchmarks/timing.py (scripts run from their folder)

from xinzhou.chat_format import render
from xinzhou.engine import Engine, SamplingParams, Token
from xinzhou.tokenizer import Tokenizer

CPU_SHAPE = dict(hidden_size=256, num_heads=8, num_kv_heads=4, head_dim=32, rotary_dim=32,
                 layer_types=("lightning",) * 7 + ("softmax",), num_experts=8, expert_dim=512, block_size=256)
PLANS = {"cpu": dict(batches=(1, 16, 64), new=32, vocab=4096),
         "cuda": dict(batches=(1, 16, 64), new=64, vocab=32768),
         "smoke": dict(batches=(1, 4), new=4, vocab=600)}


def make_checkpoint(out: Path, vocab: int, smoke: bool) -> Path:
    """A random-weight model with a tokenizer trained on task text, written as a checkpoint."""
    from xinzhou import tasks
    from xinzhou.chat_format import render_text
    from xinzhou.config import preset
    from xinzhou.hf import save_hf
    from xinzhou.model import XinzhouLM
    from xinzhou.tokenizer import train_tokenizer

    texts = [render_text(tasks.conversation(s), s.tools) for s in tasks.generate("tools", "train", 2000, 0)]
    texts += [render_text(tasks.conversation(s)) for s in tasks.generate("arithmetic", "train", 2000, 0)]
    tok = train_tokenizer(texts, vocab)
    shape = {} if smoke else CPU_SHAPE
    cfg = preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                 pad_token_id=tok.pad_id, **({"rotary_dim": 16} if smoke else shape))
    torch.manual_seed(0)
    ckpt = out / "ckpt"
    save_hf(XinzhouLM(cfg), ckpt)
    tok.save(ckpt)
    return ckpt


def questions(n: int) -> list[str]:
    from xinzhou import tasks

    return [s.messages[0]["content"] for s in tasks.generate("arithmetic", "test", n, 1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_stream(client: httpx.AsyncClient, question: str, new: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": question}], "max_tokens": new,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, usage = None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                d = c["delta"]
                if first is None and (d.get("content") or d.get("reasoning_content") or d.get("tool_calls")):
                    first = time.perf_counter() - t0
    return {"ttft_s": first if first is not None else time.perf_counter() - t0, "usage": usage,
            "end_s": time.perf_counter() - t0}


async def through_server(base_url: str, qs: list[str], new: int) -> dict:
    limits = httpx.Limits(max_connections=len(qs) + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, q, new) for q in qs))
        wall = time.perf_counter() - t0
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    return {"wall_s": wall, "completion_tokens": tokens, "ttft_s": statistics.median(r["ttft_s"] for r in results)}


def engine_alone(engine: Engine, prompts: list[list[int]], new: int, eos: int) -> dict:
    t0 = time.perf_counter()
    first: dict[int, float] = {}
    for p in prompts:
        engine.add_request(p, SamplingParams(max_new_tokens=new, stop_ids=(eos,)))
    tokens = 0
    while engine.has_work():
        for e in engine.step():
            if isinstance(e, Token):
                tokens += 1
                first.setdefault(e.request_id, time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "completion_tokens": tokens, "ttft_s": statistics.median(first.values())}


def wait_healthy(base_url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            sys.exit(f"the server exited with code {proc.returncode} before it was healthy")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"the server was not healthy after {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON results")
    parser.add_argument("--model", default=None, help="a checkpoint directory with tokenizer.json (default: random)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks every code path")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = PLANS["smoke" if args.smoke else device]
    batches, new = plan["batches"], plan["new"]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.model) if args.model else make_checkpoint(Path(tmp), plan["vocab"], args.smoke)
        tok = Tokenizer.load(ckpt)
        from xinzhou.hf import load_hf

        model = load_hf(ckpt, device=device).eval()
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "xinzhou.cli", "serve", "--model", str(ckpt), "--port", str(port),
                                 "--served-name", "bench", "--max-batch", str(max(batches))],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_healthy(base_url, proc)
            results: dict = {"env": {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                     "threads": torch.get_num_threads(), "torch": torch.__version__,
                                     "git_commit": git_commit()},
                             "plan": {"batches": list(batches), "new": new, "model": args.model or "random"},
                             "params": model.config.num_params(), "rows": []}
            print(json.dumps(results["env"]), f"{model.config.num_params() / 1e6:.1f}M params", flush=True)
            engine = Engine(model, tok, max_batch=max(batches))
            asyncio.run(through_server(base_url, questions(2), 4))  # warm both up
            engine_alone(engine, [render([{"role": "user", "content": q}], tok, add_generation_prompt=True).ids
                                  for q in questions(2)], 4, tok.eos_id)
            for C in batches:
                qs = questions(C)
                prompts = [render([{"role": "user", "content": q}], tok, add_generation_prompt=True).ids for q in qs]
                alone = engine_alone(engine, prompts, new, tok.eos_id)
                served = asyncio.run(through_server(base_url, qs, new))
                if served["completion_tokens"] != alone["completion_tokens"]:
                    print(f"  note: C={C}: the server produced {served['completion_tokens']} tokens, the engine "
                          f"{alone['completion_tokens']} (a near tie between batch shapes)", flush=True)
                row = {"C": C, "new": new, "engine": alone, "server": served}
                for k, r in (("engine", alone), ("server", served)):
                    r["tok_s"] = r["completion_tokens"] / r["wall_s"]
                    r["req_s"] = C / r["wall_s"]
                row["tok_s_server_over_engine"] = served["tok_s"] / alone["tok_s"]
                row["ttft_server_over_engine"] = served["ttft_s"] / alone["ttft_s"]
                results["rows"].append(row)
                print(f"C={C:<3} engine {alone['tok_s']:8,.0f} tok/s {alone['req_s']:6.2f} req/s ttft "
                      f"{1e3 * alone['ttft_s']:7.1f} ms | server {served['tok_s']:8,.0f} tok/s {served['req_s']:6.2f} "
                      f"req/s ttft {1e3 * served['ttft_s']:7.1f} ms | server/engine tok/s "
                      f"{row['tok_s_server_over_engine']:4.2f}x ttft {row['ttft_server_over_engine']:4.2f}x", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
