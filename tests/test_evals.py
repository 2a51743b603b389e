"""The capability-level harness scores gold outputs 100% and wrong ones 0%, and runs L4's real
tool loop (the call is executed and its result handed back)."""

import re

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


def test_right_tool_with_a_wrong_argument_fails_l4(tok, monkeypatch):
    table = oracle(tok, (4,))
    first_turns = {}
    for prompt, ids in table.items():  # the first assistant turn of each sample holds its call
        text = tok.decode(ids)
        if "<minimax:tool_call>" in text:
            # the same tool and argument names, one value off by one: well-formed, typed, wrong
            wrong = re.sub(r'(<parameter name="(?:b|quantity)">)(\d+)', lambda m: m[1] + str(int(m[2]) + 1), text)
            assert wrong != text
            first_turns[prompt] = render_ids_of(tok, wrong)

    def model(model_, prompts, cfg):
        outs = []
        for p in prompts:
            if tuple(p) in first_turns:
                ids = first_turns[tuple(p)]
            else:  # after the wrong call's real result: answer with that result, as a model would
                result = re.findall(r"<response>(.*?)</response>", tok.decode(p))[-1]
                ids = render_ids_of(tok, f"\n</think>\n\n{result}[e~[")
            ids = ids[:ids.index(tok.eos_id) + 1]
            outs.append(Completion(ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop"))
        return outs

    monkeypatch.setattr(evals, "generate", model)
    r = evals.evaluate_level(None, tok, 4, n=12)
    assert r.details["well-formed call"] == 1.0 and r.details["right call"] == 0.0
    assert r.details["right answer"] == 0.0  # the answer follows the wrong call's result
    assert r.score == 0.0 and not r.passed
    lo, hi = r.ci
    assert lo == 0.0 and 0.2 < hi < 0.3  # Wilson upper bound at 0 / 12


def render_ids_of(tok, markup: str) -> list[int]:
    """Ids of model output written as markup: marker spellings become their special ids."""
    from xinzhou.tokenizer import SPECIAL_TOKENS

    pattern = "(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")"
    ids = []
    for piece in re.split(pattern, markup):
        if piece in SPECIAL_TOKENS:
            ids.append(tok.special_id(piece))
        elif piece:
            ids += tok.encode(piece)
    return ids


def test_wilson_interval_values():
    assert evals.wilson(0, 0) == (0.0, 1.0)
    lo, hi = evals.wilson(90, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.8256, 0.9448)
    lo, hi = evals.wilson(200, 200)
    assert hi == 1.0 and 0.98 < lo < 0.985
