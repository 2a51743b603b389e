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


FREE_FORM = {"description": "Look it up.", "format": {"type": "grammar", "syntax": "regex", "definition": "[a-z0-9 ]+"}}


def train_tool_model(out: Path, steps: int = 300) -> Path:
    """A tiny hybrid model trained only on the L4 tool conversations (call -> result -> answer), so
    that it really emits tool calls: after 300 steps (half a minute on a CPU core) 99 of 100 held-out
    L4 questions get a well-formed call (not the right one: that takes the speedrun's pretraining).
    At 100 steps it was 35-58%, and which questions got one moved with any change to the tokenizer.
    One conversation in four offers its tool free-form instead (a Responses custom tool, shaped
    FREE_FORM: one string `input`), which a model that never saw one answers with garbage."""
    from xinzhou import tasks
    from xinzhou.chat_format import render_text
    from xinzhou.config import preset
    from xinzhou.data import tokenize_docs, write_shards
    from xinzhou.server.openai_responses import _custom_tool
    from xinzhou.tokenizer import train_tokenizer
    from xinzhou.train import TrainConfig, train

    samples = tasks.generate("tools", "train", 3000, 0)
    convs = [dict(messages=tasks.conversation(s), tools=s.tools, keep_all_thinking=True) for s in samples]
    for c in convs[::4]:
        call = c["messages"][1]["tool_calls"][0]["function"]
        c["tools"] = [_custom_tool({"type": "custom", "name": call["name"], **FREE_FORM}, 0)]
        call["arguments"] = {"input": " ".join(str(v) for v in call["arguments"].values())}
    tok = train_tokenizer([render_text(c["messages"], c["tools"], keep_all_thinking=True) for c in convs[:500]], 700)
    tok_path = tok.save(out / "tok")
    write_shards(tokenize_docs(convs, tok), out / "shards", tok.vocab_size)
    cfg = preset("tiny", vocab_size=tok.vocab_size, layer_types=("lightning", "softmax"), rotary_dim=16,
                 bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                 max_position_embeddings=2048)
    return train(cfg, TrainConfig(data=str(out / "shards"), out_dir=str(out / "train"), steps=steps, lr=5e-3,
                                  seq_len=384, batch_size=8, warmup_steps=10, tokenizer=str(tok_path), progress=False))


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
