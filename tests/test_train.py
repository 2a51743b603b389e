"""The training loop: accumulation and ranks give the same curve, a SIGKILL'd run resumes
bitwise, half-written checkpoints are never loaded, and checkpoints load into transformers."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from xinzhou.config import preset
from xinzhou.data import write_shards
from xinzhou.hf import CheckpointError, load_hf
from xinzhou.tokenizer import train_tokenizer
from xinzhou.train import TrainConfig, train

V = 97


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(400):  # learnable structure: arithmetic progressions mod V
        start, step, n = (int(x) for x in (rng.integers(1, V), rng.integers(1, 5), rng.integers(8, 30)))
        ids = [(start + i * step) % V for i in range(n)]
        docs.append((ids, [0] + [1] * (n - 1)))
    return write_shards(docs, tmp_path_factory.mktemp("data") / "sh", vocab_size=V)


def curve(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def cfg(shard, out, **kw):
    base = dict(data=str(shard), out_dir=str(out), seq_len=32, steps=4, lr=3e-3, warmup_steps=2, progress=False)
    return TrainConfig(**(base | kw))


def test_grad_accumulation_1x8_equals_8x1(shard, tmp_path):
    # the balance loss is a property of the batch each forward sees, so it is off here: this
    # checks that accumulation sums token losses exactly as one big batch does
    model_cfg = preset("tiny", vocab_size=V, router_aux_loss_coef=0.0)
    train(model_cfg, cfg(shard, tmp_path / "big", batch_size=8, grad_accum=1))
    train(model_cfg, cfg(shard, tmp_path / "acc", batch_size=1, grad_accum=8))
    a, b = curve(tmp_path / "big"), curve(tmp_path / "acc")
    assert len(a) == 4 and a[-1] < a[0]
    assert np.abs(np.array(a) - np.array(b)).max() <= 1e-5
    wa = load_hf(tmp_path / "big" / "ckpt").state_dict()
    wb = load_hf(tmp_path / "acc" / "ckpt").state_dict()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def _train_cmd(shard, out, *extra):
    return [sys.executable, "-m", "xinzhou.train", "--data", str(shard), "--out", str(out), "--preset", "tiny",
            "--vocab-size", str(V), "--seq-len", "32", "--warmup-steps", "2", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_processes_fsdp_match_one_process(shard, tmp_path, optimizer):
    # the same micro-batches either way: 1 rank x 2 accumulation steps, or 2 ranks x 1; Muon
    # orthogonalises each sharded matrix whole, so its updates do not depend on the sharding
    opt = ("--optimizer", optimizer)
    subprocess.run(_train_cmd(shard, tmp_path / "one", "--steps", "4", "--batch-size", "1", "--grad-accum", "2", *opt),
                   check=True, env=ENV, timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29500 + random.randrange(1000))]
    cmd = _train_cmd(shard, tmp_path / "two", "--steps", "4", "--batch-size", "1", "--grad-accum", "1", *opt)
    run = subprocess.run(torchrun + cmd[1:], env=ENV, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert len(a) == len(b) == 4
    assert np.abs(np.array(a) - np.array(b)).max() <= 1e-5
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    ref = load_hf(tmp_path / "one" / "ckpt").state_dict()
    got = load_hf(tmp_path / "two" / "ckpt").state_dict()  # the full (unsharded) weights were saved
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) < 1e-5


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sigkill_and_resume_gives_the_same_curve_bitwise(shard, tmp_path, optimizer):
    args = ("--steps", "14", "--batch-size", "2", "--ckpt-every", "3", "--optimizer", optimizer)
    subprocess.run(_train_cmd(shard, tmp_path / "ref", *args), check=True, env=ENV, timeout=300)
    out = tmp_path / "killed"
    kill_after = random.Random().randint(4, 12)  # rows in metrics.jsonl before the kill
    proc = subprocess.Popen(_train_cmd(shard, out, *args), env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "ckpt" / "trainer_state.pt").exists()
    subprocess.run(_train_cmd(shard, out, *args), check=True, env=ENV, timeout=300)
    assert curve(out) == curve(tmp_path / "ref")  # bitwise, not approximately
    assert torch.equal(load_hf(out / "ckpt").embed.weight, load_hf(tmp_path / "ref" / "ckpt").embed.weight)


def test_half_written_checkpoint_is_never_loaded(shard, tmp_path, monkeypatch):
    model_cfg = preset("tiny", vocab_size=V)
    out = tmp_path / "run"
    train(model_cfg, cfg(shard, out, steps=2))
    good = load_hf(out / "ckpt").embed.weight.clone()
    # a crash in the middle of writing the next checkpoint
    import xinzhou.train as tr

    def crash(*a, **k):
        raise OSError("killed mid-write")

    monkeypatch.setattr(tr.torch, "save", crash)
    with pytest.raises(OSError, match="mid-write"):
        train(model_cfg, cfg(shard, out, steps=4))
    monkeypatch.undo()
    assert torch.equal(load_hf(out / "ckpt").embed.weight, good)  # the complete one is still there
    assert not [p for p in out.iterdir() if p.name.startswith(".ckpt.tmp")]
    state = torch.load(out / "ckpt" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2


def test_crash_between_checkpoint_renames_resumes_from_the_last_checkpoint(shard, tmp_path):
    model_cfg = preset("tiny", vocab_size=V)
    out = tmp_path / "run"
    train(model_cfg, cfg(shard, out, steps=2))
    inode = (out / "ckpt" / "trainer_state.pt").stat().st_ino
    # what a kill between `ckpt -> .ckpt.old-*` and `tmp -> ckpt` leaves: no ckpt/, a complete old
    # one, and the temporary of the interrupted write (still tagged: its writer died mid-write)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "ckpt").rename(out / f".ckpt.old-{dead.pid}-beef")
    tmp = out / f".ckpt.tmp-{dead.pid}-cafe"
    tmp.mkdir()
    (tmp / ".xinzhou-tmp").write_text(json.dumps({"pid": dead.pid, "host": __import__("socket").gethostname()}))
    (tmp / "model.safetensors").write_bytes(b"half")
    train(model_cfg, cfg(shard, out, steps=2))  # resumes at step 2 of 2: nothing to train, nothing rewritten
    assert (out / "ckpt" / "trainer_state.pt").stat().st_ino == inode  # the old checkpoint itself, moved back
    assert sorted(p.name for p in out.iterdir()) == ["ckpt", "loss.png", "metrics.jsonl", "run.json"]
    assert torch.load(out / "ckpt" / "trainer_state.pt", weights_only=False)["step"] == 2


def test_lr_schedule_values():
    from xinzhou.train import lr_at
    c = TrainConfig(data="d", out_dir="o", lr=1.0, warmup_steps=4, steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, c) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # linear warmup to the peak
    assert lr_at(4, c) == 1.0  # cosine from the peak ...
    assert lr_at(9, c) == pytest.approx(0.1 + 0.9 * 0.5)  # ... through the midpoint ...
    assert lr_at(14, c) == pytest.approx(0.1) and lr_at(100, c) == pytest.approx(0.1)  # ... to min_lr_ratio * lr


def test_sigmoid_router_bias_is_nudged_toward_balance(shard, tmp_path):
    # M2-style model with a router that starts heavily skewed toward expert 0
    model_cfg = preset("tiny", vocab_size=V, layer_types=("softmax", "softmax"), router="sigmoid", qk_norm=True,
                       residual="prenorm", router_aux_loss_coef=0.0)
    init = tmp_path / "init"
    from xinzhou.hf import save_hf
    from xinzhou.model import XinzhouLM
    torch.manual_seed(0)
    model = XinzhouLM(model_cfg)
    with torch.no_grad():
        for block in model.layers:
            block.moe.correction_bias.copy_(torch.tensor([0.5, 0.0, 0.0, 0.0]))
    save_hf(model, init)
    train(model_cfg, cfg(shard, tmp_path / "run", steps=6, init_from=str(init), bias_update_rate=0.01))
    bias = load_hf(tmp_path / "run" / "ckpt").layers[0].moe.correction_bias
    assert bias[0].item() == pytest.approx(0.5 - 6 * 0.01)  # over-loaded every step: lowered each time
    assert (bias[1:] > 0).all()


def test_incompatible_checkpoint_is_named(shard, tmp_path):
    train(preset("tiny", vocab_size=V), cfg(shard, tmp_path / "a", steps=1))
    with pytest.raises(CheckpointError, match=r"incompatible checkpoint: hidden_size is 64 there, 96 here"):
        train(preset("tiny", vocab_size=V, hidden_size=96), cfg(shard, tmp_path / "b", steps=1,
                                                                   init_from=str(tmp_path / "a" / "ckpt")))


def test_checkpoint_and_tokenizer_load_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")  # the test extra; the oracle
    texts = [f"{a}+{b}={a + b}" for a in range(40) for b in range(40)] + ["hello world, the heart-boat"] * 50
    tok = train_tokenizer(texts, vocab_size=300)
    tok_path = tok.save(tmp_path / "tok")
    from xinzhou.data import tokenize_docs
    shard = write_shards(tokenize_docs(texts, tok), tmp_path / "sh", vocab_size=tok.vocab_size)
    # rotary_dim == head_dim: transformers' MiniMax rotates the whole head (the known departure,
    # see README), so a checkpoint meant for transformers uses full rotary, as the speedrun does
    model_cfg = preset("tiny", vocab_size=tok.vocab_size, rotary_dim=16, bos_token_id=tok.bos_id,
                       eos_token_id=tok.eos_id)
    ckpt = train(model_cfg, cfg(shard, tmp_path / "run", steps=3, tokenizer=str(tok_path)))
    ours = load_hf(ckpt).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"))
    for text in ["17+23=40", "hello world", "<think>not special</think>"]:
        assert hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == tok.encode(text)
    x = torch.tensor([tok.encode("12+30=42 hello")])
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4


def test_scoring_during_training_leaves_the_run_unchanged(shard, tmp_path):
    # the hook runs the model and draws random numbers; the run must train exactly as without it
    model_cfg = preset("tiny", vocab_size=V)
    seen = []

    def hook(step, model):
        seen.append((step, model.training, torch.is_grad_enabled()))
        model(torch.randint(0, V, (2, 9)))
        random.random(), np.random.rand(), torch.rand(3)

    train(model_cfg, cfg(shard, tmp_path / "plain"))
    train(model_cfg, cfg(shard, tmp_path / "scored"), on_step=hook)
    assert seen == [(s, False, False) for s in (1, 2, 3, 4)]
    assert curve(tmp_path / "plain") == curve(tmp_path / "scored")
    wa = load_hf(tmp_path / "plain" / "ckpt").state_dict()
    wb = load_hf(tmp_path / "scored" / "ckpt").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_doc_mask_changes_what_the_model_sees(shard, tmp_path):
    # windows pack several documents: masked, the loss of the first step differs from unmasked
    model_cfg = preset("tiny", vocab_size=V)
    train(model_cfg, cfg(shard, tmp_path / "masked", steps=1))
    train(model_cfg, cfg(shard, tmp_path / "open", steps=1, doc_mask=False))
    a, b = curve(tmp_path / "masked")[0], curve(tmp_path / "open")[0]
    assert abs(a - b) > 1e-6
