"""The capability-level harness scores gold outputs 100% and wrong ones 0%, and runs L4's real
tool loop (the call is executed and its result handed back)."""

import pytest

from xinzhou import evals, tasks
from xinzhou.chat_format import render, render_text
from xinzhou.engine import Completion
from xinzhou.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    texts = tasks.pretrain_text(0, 400)
    for fam in tasks.FAMILIES:
        texts += [render_text(tasks.conversation(s), s.tools) for s in tasks.generate(fam, "train", 30, 0)]
    return train_tokenizer(texts, vocab_size=600)


def oracle(tok, levels):
    """A stand-in for the model: maps each prompt to the gold next assistant turn."""
    table = {}
    for lv in levels:
        spec = tasks.LEVELS[lv]
        for s in tasks.generate(spec.family, "test", 12, 0, **spec.params):
            conv = tasks.conversation(s)
            for i, m in enumerate(conv):
                if m["role"] != "assistant":
                    continue
                prompt = render(conv[:i], tok, tools=s.tools, add_generation_prompt=True).ids
                full = render(conv[:i + 1], tok, tools=s.tools).ids
                assert full[:len(prompt)] == prompt
                table[tuple(prompt)] = full[len(prompt):]
    return table


def test_gold_outputs_score_full_marks_and_garbage_scores_zero(tok, monkeypatch):
    levels = (1, 2, 3, 4, 5)
    table = oracle(tok, levels)
    calls = []

    def gold(model, prompts, cfg):
        calls.append(len(prompts))
        outs = []
        for p in prompts:
            ids = table[tuple(p)]
            ids = ids[:ids.index(tok.eos_id) + 1]  # a model stops at the end-of-turn token
            outs.append(Completion(ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop"))
        return outs

    monkeypatch.setattr(evals, "generate", gold)
    for lv in levels:
        r = evals.evaluate_level(None, tok, lv, n=12, batch_size=5)
        assert (r.score, r.answer_accuracy, r.passed) == (1.0, 1.0, True), (lv, r.examples)
    assert len(calls) == 5 * 3 + 3  # batches of 5 over 12 prompts; L4 runs a second (tool result) round

    def garbage(model, prompts, cfg):
        return [Completion(ids=tok.encode("no idea") + [tok.eos_id]) for _ in prompts]

    monkeypatch.setattr(evals, "generate", garbage)
    results = [evals.evaluate_level(None, tok, lv, n=12) for lv in levels]
    assert all(r.score == 0.0 and not r.passed for r in results)
    md = evals.report_markdown(results)
    assert "| L2 | arithmetic |" in md and "0.0%" in md
