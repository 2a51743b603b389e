"""The RL trainer end to end at toy size: rollouts through the engine with the training forward's
log-probabilities, rewards from the verifier, metrics per step, a checkpoint that resumes."""

import json

import pytest
import torch

from xinzhou import tasks
from xinzhou.chat_format import render_text
from xinzhou.config import preset
from xinzhou.hf import load_hf, save_hf
from xinzhou.model import XinzhouLM
from xinzhou.rl_train import RLConfig, _batch, looping, rl_train, rollouts
from xinzhou.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    texts = tasks.pretrain_text(0, 200) + [render_text(tasks.conversation(s)) for s in
                                           tasks.generate("countdown", "train", 50, 0)]
    tok = train_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    model = XinzhouLM(preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    d = tmp_path_factory.mktemp("ck") / "ckpt"
    save_hf(model, d)
    tok.save(d)
    return d


def small(ckpt, out, **kw):
    base = dict(model=str(ckpt), out_dir=str(out), steps=2, prompts_per_step=2, group_size=3, updates_per_step=2,
                max_new_tokens=8, eval_n=4, eval_every=1, progress=False, lr=1e-3)
    return RLConfig(**(base | kw))


def test_rollout_logprobs_are_the_training_forward_s(ckpt, tmp_path):
    from xinzhou.tokenizer import Tokenizer
    from xinzhou.rl_train import _policy

    model, tok = load_hf(ckpt, lm_head_fp32=True), Tokenizer.load(ckpt)
    cfg = small(ckpt, tmp_path / "x")
    rs = rollouts(model, tok, tasks.generate("countdown", "train", 2, 0), cfg, step=0)
    assert len(rs) == 6 and all(len(r.output) == len(r.old_logp) > 0 for r in rs)
    assert {r.group for r in rs} == {0, 1} and all(r.finish in ("stop", "length", "repetition") for r in rs)
    ids, old, mask, _ = _batch(rs, torch.device("cpu"), mask_unfinished=False)
    with torch.no_grad():
        logp, _ = _policy(model.eval(), ids)
    on = mask > 0
    assert on.sum() == sum(len(r.output) for r in rs)
    assert torch.allclose(logp[on], old[on], atol=1e-4)  # one definition of a token's log-probability


@pytest.mark.parametrize("loss", ["cispo", "dapo", "grpo"])
def test_rl_train_runs_logs_and_resumes(ckpt, tmp_path, loss):
    out = tmp_path / loss
    before = load_hf(ckpt).state_dict()
    # every rollout finishes by length at 8 tokens: count them, so the loss is not empty
    path = rl_train(small(ckpt, out, loss=loss, dynamic_sampling=False))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [-1, 0, 1]
    for r in rows[1:]:
        for key in ("reward", "response_len", "repetition_rate", "pass_rate", "lr"):
            assert key in r, key
    for r in rows:  # each held-out problem's outcome, for a paired comparison with a later score
        assert len(r["outcomes"]) == 4 and set(r["outcomes"]) <= {"0", "1"}
        assert r["pass_rate"] == r["outcomes"].count("1") / 4
    assert (out / "rl.png").exists() and (path / "tokenizer.json").exists()
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2
    rl_train(small(ckpt, out, loss=loss, steps=3, dynamic_sampling=False))  # resumes at step 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [-1, 0, 1, 2]
    assert load_hf(path).config.vocab_size == load_hf(ckpt).config.vocab_size
    assert before.keys() == load_hf(path).state_dict().keys()


def test_bad_config_is_refused(ckpt, tmp_path):
    with pytest.raises(ValueError, match="loss = 'ppo2'"):
        small(ckpt, tmp_path, loss="ppo2")
    with pytest.raises(ValueError, match="group_size = 1"):
        small(ckpt, tmp_path, group_size=1)
    with pytest.raises(ValueError, match="eval_every = -1"):
        small(ckpt, tmp_path, eval_every=-1)


def test_looping_is_exact_repetition_not_confidence() -> None:
    assert looping([5, 6, 7] * 20, 48)
    assert looping(list(range(24)) * 3, 48) and not looping(list(range(25)) * 3, 48)  # block <= 48 // 2
    assert not looping([7] * 48, 48) and looping([7] * 49, 48)  # the window and one more block
    assert not looping([1] * 10 + [2] * 40, 48)
    # a long search never repeats a whole line: a token at a time, it is never a loop
    lines, _ = tasks.countdown.search([2, 3, 10], 17)
    text = [ord(ch) for ch in "\n".join(lines)]
    assert not any(looping(text[:i], 48) for i in range(len(text) + 1))
