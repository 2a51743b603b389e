"""Test session setup: Triton kernels run on the CPU interpreter when there is no GPU. The variable
must be set before anything imports triton, hence here."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@dataclass
class Served:
    """A real `xinzhou serve` app on loopback over a model trained for a minute on tool calls."""
    base_url: str
    worker: object
    tokenizer: object
    model: object
    prompts: list  # the prompt ids of every request the server ran, in order
    ckpt: Path
    name: str = "xz-test"


def train_tool_model(out: Path, steps: int = 100) -> Path:
    """A tiny hybrid model trained only on the L4 tool conversations (call -> result -> answer), so
    that it really emits tool calls; about a minute on 2 CPU cores."""
    from xinzhou import tasks
    from xinzhou.chat_format import render_text
    from xinzhou.config import preset
    from xinzhou.data import tokenize_docs, write_shards
    from xinzhou.tokenizer import train_tokenizer
    from xinzhou.train import TrainConfig, train

    samples = tasks.generate("tools", "train", 3000, 0)
    convs = [dict(messages=tasks.conversation(s), tools=s.tools, keep_all_thinking=True) for s in samples]
    tok = train_tokenizer([render_text(c["messages"], c["tools"], keep_all_thinking=True) for c in convs[:500]], 700)
    tok_path = tok.save(out / "tok")
    write_shards(tokenize_docs(convs, tok), out / "shards", tok.vocab_size)
    cfg = preset("tiny", vocab_size=tok.vocab_size, layer_types=("lightning", "softmax"), rotary_dim=16,
                 bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                 max_position_embeddings=2048)
    return train(cfg, TrainConfig(data=str(out / "shards"), out_dir=str(out / "train"), steps=steps, lr=5e-3,
                                  seq_len=384, batch_size=8, warmup_steps=10, tokenizer=str(tok_path), progress=False,
                                  # the outputs the server tests were written against (trained before
                                  # document masking became the default)
                                  doc_mask=False))


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    import uvicorn

    from xinzhou.server.app import create_app, load_worker

    ckpt = train_tool_model(tmp_path_factory.mktemp("served"))
    worker = load_worker(ckpt, max_batch=16)
    prompts: list = []
    submit = worker.submit

    def recording_submit(prompt, *a, **k):  # what the server received, for the tests to read
        prompts.append(list(prompt))
        return submit(prompt, *a, **k)

    worker.submit = recording_submit
    app = create_app(worker, "xz-test")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the test server did not start"
    yield Served(f"http://127.0.0.1:{port}", worker, worker.tokenizer, worker.engine.model, prompts, ckpt)
    server.should_exit = True
    thread.join(timeout=10)
    worker.close()
