"""Task families: determinism, train/test disjointness, verifiers on gold and on wrong answers."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from xinzhou.tasks import (
    FAMILIES, LEVELS, Parsed, Sample, conversation, generate, gold_parsed, pretrain_text, split_of, verify,
)
from xinzhou import tasks
from xinzhou.tasks import arithmetic, countdown, recall, retrieval, tools
from xinzhou.tasks.common import NAMES, user_text


def answer_only(content: str) -> Parsed:
    return Parsed(reasoning="", content=content, tool_calls=[])


def call(name: str, arguments: object) -> Parsed:
    return Parsed(tool_calls=[{"id": "call_0", "type": "function", "function": {"name": name, "arguments": arguments}}])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_deterministic(family: str) -> None:
    a, b = generate(family, "train", 50, seed=3), generate(family, "train", 50, seed=3)
    assert a == b
    assert generate(family, "test", 20, seed=3) == generate(family, "test", 20, seed=3)
    assert a != generate(family, "train", 50, seed=4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_test_disjoint(family: str) -> None:
    train, test = generate(family, "train", 3000, seed=0), generate(family, "test", 400, seed=1)
    train_keys, test_keys = {s.meta["key"] for s in train}, [s.meta["key"] for s in test]
    assert train_keys.isdisjoint(test_keys)
    assert len(set(test_keys)) == len(test_keys)  # an eval set of distinct problems
    assert {user_text(s) for s in train}.isdisjoint(user_text(s) for s in test)
    assert all(split_of(s.meta["key"]) == s.meta["split"] for s in train + test)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gold_target_verifies(family: str) -> None:
    for s in generate(family, "train", 200, seed=0) + generate(family, "test", 100, seed=0):
        assert s.family == family and s.level == FAMILIES[family].LEVEL
        final = s.target[-1]
        spaced = s.meta.get("kind") == "repeat"  # a copied sequence keeps the prompt's space (recall)
        assert final["role"] == "assistant" and final["content"] == (f" {s.answer}" if spaced else s.answer)
        assert verify(s, gold_parsed(final))
        assert conversation(s)[: len(s.messages)] == s.messages


def test_bad_arguments_name_the_problem() -> None:
    with pytest.raises(ValueError, match="split"):
        generate("arithmetic", "dev", 1, seed=0)
    with pytest.raises(ValueError, match="unknown task family"):
        generate("chess", "train", 1, seed=0)
    with pytest.raises(ValueError, match="distinct test problems"):
        generate("arithmetic", "test", 100, seed=0, digits=1)


def test_levels_generate_their_eval_sets() -> None:
    assert sorted(LEVELS) == [1, 2, 3, 4, 5]
    for lv in LEVELS.values():
        samples = generate(lv.family, "test", lv.n, seed=0, **lv.params)
        assert len(samples) == lv.n and all(s.level == lv.level for s in samples)
        assert 0 < lv.threshold <= 1 and lv.metric in ("verify", "tool_task") and lv.reason


# --- L1 / L2 / L5: exact answers ---------------------------------------------------------------

def test_arithmetic_two_digit_and_off_by_one() -> None:
    for s in generate("arithmetic", "test", 300, seed=0, digits=2):
        a, op, b = s.meta["a"], s.meta["op"], s.meta["b"]
        assert op == "+" and 10 <= a <= 99 and 10 <= b <= 99
        assert s.messages == [{"role": "user", "content": f"{a}+{b}="}] and s.answer == str(a + b)
        assert verify(s, answer_only(f" {a + b}\n"))
        assert not verify(s, answer_only(str(a + b + 1))) and not verify(s, answer_only(str(a + b - 1)))
        assert not verify(s, answer_only(f"{a + b}0"))
    for s in generate("arithmetic", "train", 100, seed=0, digits=4, ops=("+", "-", "*")):
        a, op, b = s.meta["a"], s.meta["op"], s.meta["b"]
        assert 1000 <= a <= 9999 and 1000 <= b <= 9999 and int(s.answer) == arithmetic.OPS[op](a, b) >= 0


def test_column_sums_scratchpad() -> None:
    assert arithmetic.column_sums(47, 38) == "7+8=15\n4+3+1=8"
    assert arithmetic.column_sums(97, 38) == "7+8=15\n9+3+1=13"
    assert arithmetic.column_sums(12, 34) == "2+4=6\n1+3=4"


def test_recall_rejects_wrong_word() -> None:
    for s in generate("recall", "train", 200, seed=0):
        prompt = user_text(s)
        if s.meta["kind"] == "repeat":
            assert s.answer == prompt.removeprefix("Repeat: ")
            # the demonstration writes each word as the prompt does, with its space; either form passes
            assert s.target[0]["content"] == f" {s.answer}" and prompt.endswith(s.target[0]["content"])
            assert verify(s, answer_only(s.answer)) and verify(s, answer_only(f" {s.answer}"))
            assert not verify(s, answer_only(" ".join(s.answer.split()[:-1])))
        else:
            wrong = next(w for w in ("apple", "river") if w != s.answer)
            assert f"{prompt.splitlines()[1][0]}={s.answer}" in prompt
            assert not verify(s, answer_only(wrong))


def test_recall_key_lookup_thinking() -> None:
    assert recall._scan("c=ocean f=mango a=lemon\nf?") == "c:f=ocean f:f=mango"
    assert recall._scan("c=ocean f=mango a=lemon\nc?") == "c:c=ocean"
    assert recall._scan("c=ocean f=mango a=lemon\na?") == "c:a=ocean f:a=mango a:a=lemon"
    assert recall._pair("c=ocean f=mango a=lemon\nc?") == " c=ocean"
    assert recall._check("c=ocean f=mango a=lemon\nf?") == " c: f no=ocean f: f yes=mango"
    assert recall._check("c=ocean f=mango a=lemon\nc?") == " c: c yes=ocean"
    assert recall._pair("c=ocean f=mango a=lemon\na?") == " a=lemon"
    for fn in (recall._scan, recall._pair, recall._check):
        with pytest.raises(ValueError, match="key 'b' is not in the list"):
            fn("c=ocean f=mango\nb?")
    with pytest.raises(ValueError, match="thinking = 'loud'"):
        generate("recall", "train", 2, seed=0, thinking="loud")
    plain = generate("recall", "train", 200, seed=3)
    for mode in ("scan", "pair", "check"):
        samples = generate("recall", "train", 200, seed=3, thinking=mode)
        assert [s.messages for s in samples] == [s.messages for s in plain]  # the same problems
        for s, p in zip(samples, plain):
            thinking = s.target[0]["reasoning_content"]
            assert p.target[0]["reasoning_content"] == "" and s.answer == p.answer
            if s.meta["kind"] == "repeat":
                assert thinking == ""
                continue
            pairs, query = user_text(s).split("\n")
            asked = query[:-1]
            if mode == "pair":
                assert thinking == f" {asked}={s.answer}" and f"{asked}={s.answer}" in pairs.split()
                continue
            if mode == "check":
                checks = re.findall(r" (\w): (\w) (yes|no)=(\w+)", thinking)
                assert "".join(f" {k}: {a} {v}={w}" for k, a, v, w in checks) == thinking  # nothing else
                assert [f"{k}={w}" for k, _, _, w in checks] == pairs.split()[:len(checks)]
                assert [v for *_, v, _ in checks] == ["no"] * (len(checks) - 1) + ["yes"]
                assert {a for _, a, _, _ in checks} == {asked} and checks[-1][::3] == (asked, s.answer)
                continue
            written = thinking.split()
            assert " ".join(w.replace(f":{asked}=", "=") for w in written) == " ".join(pairs.split()[:len(written)])
            assert written[-1] == f"{asked}:{asked}={s.answer}"
            assert [w.split(":")[0] for w in written].count(asked) == 1


def test_retrieval_thinking_and_lengths() -> None:
    bare = generate("retrieval", "train", 40, seed=5)
    fact = generate("retrieval", "train", 40, seed=5, thinking="fact")
    assert [s.messages for s in bare] == [s.messages for s in fact]  # the same problems either way
    for b, f in zip(bare, fact):
        assert b.target[0]["reasoning_content"] == ""
        name, code = f.meta["name"], f.meta["code"]
        assert f.target[0]["reasoning_content"] == f" The code of {name} is {code}." and f.answer == str(code)
        assert f.target[0]["reasoning_content"].strip() in user_text(f)  # the haystack's own sentence
    with pytest.raises(ValueError, match="thinking = 'scan'"):
        generate("retrieval", "train", 2, seed=0, thinking="scan")
    with pytest.raises(ValueError, match="min_length <= length"):
        generate("retrieval", "train", 2, seed=0, length=50, min_length=60)
    assert {s.meta["length"] for s in bare} == {200}  # without min_length, every haystack is `length`
    lengths = [s.meta["length"] for s in generate("retrieval", "train", 200, seed=1, length=120, min_length=20)]
    assert min(lengths) >= 20 and max(lengths) <= 120 and len(set(lengths)) > 50
    for s in generate("retrieval", "train", 50, seed=2, length=120, min_length=20):
        filler = len(user_text(s).split()) - 6 * 3 - 6  # three facts of six words, the question's six
        assert s.meta["length"] <= filler <= s.meta["length"] + 6  # filler sentences are 7 words


def test_retrieval_fact_appears_once() -> None:
    for length in (50, 200, 1000):
        for s in generate("retrieval", "train", 30, seed=length, length=length, decoys=3):
            prompt, name, code = user_text(s), s.meta["name"], s.meta["code"]
            assert prompt.count(retrieval.fact(name, code)) == 1
            assert prompt.count(str(code)) == 1 and prompt.count(f"code of {name} is") == 1
            assert prompt.count("The code of") == 4 and prompt.endswith(f"\nWhat is the code of {name}?")
            assert length <= len(prompt.split()) <= length + 50
            assert verify(s, answer_only(str(code)))
            assert not verify(s, answer_only(str(code + 1)))


# --- L3: countdown -------------------------------------------------------------------------------

def test_countdown_search_by_hand() -> None:
    assert countdown.search([3, 5, 4], 32) == (["3+5=8 8+4=12:32 8*4=32:32 yes"], "(3+5)*4")
    assert countdown.search([3, 5, 4], 11) == (
        ["3+5=8 8+4=12:11 8*4=32:11 8-4=4:11", "3*5=15 15+4=19:11 15*4=60:11 15-4=11:11 yes"], "(3*5)-4")
    # the smaller from the larger: 9-5, and the answer keeps that order
    assert countdown.search([2, 3, 9], 4) == (["2+3=5 5+9=14:4 5*9=45:4 9-5=4:4 yes"], "9-(2+3)")
    # the second pair (n0, n2) after all three first steps of the first pair
    lines, answer = countdown.search([2, 3, 10], 17)
    assert len(lines) == 5 and answer == "(2*10)-3"
    assert lines[3] == "2+10=12 12+3=15:17 12*3=36:17 12-3=9:17"
    assert lines[4] == "2*10=20 20+3=23:17 20*3=60:17 20-3=17:17 yes"
    # 3*10 = 30 uses two of the numbers only: a first step is never a hit, and 30 is not reachable
    with pytest.raises(ValueError, match="not reachable"):
        countdown.search([2, 3, 10], 30)


def test_countdown_samples_and_search() -> None:
    samples = generate("countdown", "train", 500, seed=0)
    assert max(s.meta["attempts"] for s in samples) >= 4  # searches that go past their first lines
    pairs = lambda n: [(n[0], n[1], n[2]), (n[0], n[2], n[1]), (n[1], n[2], n[0])]
    for s in samples:
        nums, target = s.meta["numbers"], s.meta["target"]
        assert len(nums) == 3 and 1 <= target <= 99
        assert user_text(s) == f"Make {target} from {' '.join(map(str, nums))}"
        assert verify(s, answer_only(s.answer)) and countdown.evaluate(s.answer)[0] == target
        lines = s.target[-1]["reasoning_content"].splitlines()
        assert len(lines) == s.meta["attempts"] + 1
        assert lines[-1].endswith(" yes") and not any("yes" in l for l in lines[:-1])
        for i, line in enumerate(lines):  # line i: pair i // 3 with op "+*-"[i % 3], then the rest by + * -
            a, b, c = pairs(nums)[i // 3]
            steps = line.removesuffix(" yes").split(" ")
            values = []
            for j, step in enumerate(steps):
                expr, value = step.split("=")
                if j:  # every result after the first step is shown beside the target
                    value, shown = value.split(":")
                    assert int(shown) == target
                x, op, y = re.fullmatch(r"(\d+)([-+*])(\d+)", expr).groups()
                assert countdown.evaluate(expr)[0] == int(value) >= 0  # every step exact, never negative
                assert op == "+*-"[i % 3 if j == 0 else j - 1]
                assert sorted([int(x), int(y)]) == sorted([a, b] if j == 0 else [values[0], c])
                values.append(int(value))
            assert (values[-1] == target) == (i == len(lines) - 1)  # the search stops at its first hit
            assert target not in values[1:-1] and (i == len(lines) - 1 or len(values) == 4)


def test_countdown_details_count_exact_steps_and_searches() -> None:
    from xinzhou.tasks.common import Parsed
    from xinzhou.tasks.common import assistant
    s32, s11 = (Sample(messages=[], target=[assistant(answer, "\n".join(lines))], answer=answer, level=3,
                       family="countdown", meta={"numbers": [3, 5, 4], "target": t})
                for t in (32, 11) for lines, answer in [countdown.search([3, 5, 4], t)])
    right = Parsed(reasoning="3+5=8 8+4=12:32 8*4=32:32 yes", content="(3+5)*4")
    # 8 steps written: 3*5=16 and 16+4=21 are wrong; 16*4=64 and 16-4=12 are exact for the value
    # written before them (a step is checked on its own), the first line is exact: 6 of 8
    slipped = Parsed(reasoning="3+5=8 8+4=12:11 8*4=32:11 8-4=4:11\n3*5=16 16+4=21:11 16*4=64:11 16-4=12:11",
                     content="")
    got = tasks.details([s32, s11], [right, slipped])
    assert got == {"steps exact": (3 + 6) / 11, "search exact": 0.5}
    assert tasks.details([s11], [Parsed(reasoning="", content="(3*5)-4")]) == {"steps exact": 0.0, "search exact": 0.0}
    assert tasks.details(generate("arithmetic", "test", 2, 0), [right, right]) == {}  # no sub-metrics there


def test_countdown_step_drills_are_exact_search_steps() -> None:
    docs = countdown.step_drills(0, 200, steps=24)
    assert docs == countdown.step_drills(0, 200, steps=24) and docs != countdown.step_drills(1, 200, steps=24)
    firsts = seconds = 0
    for doc in docs:
        steps = doc.split(" ")
        assert len(steps) == 24 and "Make" not in doc
        for step in steps:
            x, op, y, value = re.fullmatch(r"(\d+)([-+*])(\d+)=(\d+)", step).groups()
            x, y, value = int(x), int(y), int(value)
            assert countdown.evaluate(f"{x}{op}{y}")[0] == value >= 0 and (op != "-" or x >= y)
            assert min(x, y) <= 15  # a second step keeps its third number in 1..15 (its value may be 0)
            firsts += max(x, y) <= 15
            seconds += max(x, y) > 15
    assert firsts > 1000 and seconds > 1000  # both kinds, about half each (values <= 15 count as firsts)


def test_countdown_check_drills_say_yes_exactly_on_hits() -> None:
    docs = countdown.check_drills(0, 300, checks=16)
    assert docs == countdown.check_drills(0, 300, checks=16) and docs != countdown.check_drills(1, 300, checks=16)
    hits = near = 0
    for doc in docs:
        checks = re.findall(r"(\d+)([-+*])(\d+)=(\d+):(\d+)( yes)?", doc)
        assert len(checks) == 16 and "Make" not in doc
        assert re.sub(r"(\d+)([-+*])(\d+)=(\d+):(\d+)( yes)?", "", doc).strip() == ""  # nothing else
        for x, op, y, value, target, yes in checks:
            assert countdown.evaluate(f"{x}{op}{y}")[0] == int(value) and (op != "-" or int(x) >= int(y))
            assert 1 <= int(target) <= 99 and int(y) <= 15
            assert bool(yes) == (value == target)
            hits += value == target
            near += value != target and (abs(int(value) - int(target)) <= 3 or (
                len(value) == len(target) and sum(a != b for a, b in zip(value, target)) == 1))
    assert 0.45 < hits / (300 * 16) < 0.55 and near / (300 * 16) > 0.2


def test_recall_check_drills_say_yes_exactly_on_equal_keys() -> None:
    docs = recall.check_drills(0, 300, checks=16)
    assert docs == recall.check_drills(0, 300, checks=16) and docs != recall.check_drills(1, 300, checks=16)
    yes = 0
    for doc in docs:
        checks = re.findall(r" ([a-z]): ([a-z]) (yes|no)=([a-z]+)", doc)
        assert len(checks) == 16 and "".join(f" {k}: {a} {v}={w}" for k, a, v, w in checks) == doc
        assert "?" not in doc and "\n" not in doc
        for key, asked, verdict, _ in checks:
            assert (verdict == "yes") == (key == asked)
            yes += verdict == "yes"
    assert 0.45 < yes / (300 * 16) < 0.55


def test_recall_scan_drills_scan_the_whole_list() -> None:
    docs = recall.scan_drills(0, 300)
    assert docs == recall.scan_drills(0, 300) and docs != recall.scan_drills(1, 300)
    held_out = {user_text(s) for s in generate("recall", "test", 200, 0) if s.meta["kind"] == "kv"}
    ends = 0
    for doc in docs:
        listed, *scans = doc.split("\n")
        pairs = [kv.split("=") for kv in listed.split()]
        assert 3 <= len(pairs) <= 6 and len(scans) == 3 and "?" not in doc
        assert all(split_of(f"{listed}\n{k}?") == "train" for k, _ in pairs)
        assert not any(p.startswith(listed + "\n") for p in held_out)
        asked_keys = []
        for line in scans:
            checks = re.findall(r" ([a-z]): ([a-z]) (yes|no)=([a-z]+)", line)
            assert "".join(f" {k}: {a} {v}={w}" for k, a, v, w in checks) == line  # nothing else
            assert [[k, w] for k, _, _, w in checks] == pairs  # every pair, in the list's order
            (asked,) = {a for _, a, _, _ in checks}
            assert [v for _, _, v, _ in checks] == ["yes" if k == asked else "no" for k, _ in pairs]
            asked_keys.append(asked)
            ends += checks[-1][2] == "yes"
        assert len(set(asked_keys)) == 3
    assert ends < 0.5 * 3 * 300  # "yes" is not only last


def test_countdown_verifier() -> None:
    s = Sample(messages=[], target=[], answer="(3+5)*4", level=3, family="countdown",
               meta={"numbers": [3, 5, 4], "target": 32})
    for good in ("(3+5)*4", "4*(5+3)", " (3 + 5) * 4 ", "(3+5)*4=32", "(5+3)*4"):
        assert verify(s, answer_only(good)), good
    for bad in ("(3+5)*5", "(3+6)*4", "(3+5)*4+0", "(3+5)*4*1", "3+5*4", "(3+5)*4=33", "32", "8*4",
                "(3+5)*4*4/4", "", "(3+5)*", "-(3+5)*4", "(3+5)*4)", "__import__('os')"):
        assert not verify(s, answer_only(bad)), bad


def test_countdown_near_misses_fail() -> None:
    s = Sample(messages=[], target=[], answer="(2*3)*4", level=3, family="countdown",
               meta={"numbers": [2, 3, 4], "target": 24})
    assert verify(s, answer_only("(2*3)*4"))
    near = {"(3+3)*4": "reuses 3 and leaves 2 out", "(4+4)*3": "reuses 4, leaves 2 out", "2*3*4*1": "adds a 1",
            "6*4": "uses a number not given", "(2+4)*4": "reuses 4, leaves 3 out", "2*3*4=25": "wrong target",
            "2*12": "combines before using", "(2*3)*4 (2*3)*4": "two answers"}
    for text, why in near.items():
        assert not verify(s, answer_only(text)), why
    # the same multiset matters, not the set: a number given twice must be used twice
    d = Sample(messages=[], target=[], answer="(3+3)*4", level=3, family="countdown",
               meta={"numbers": [3, 3, 4], "target": 24})
    assert verify(d, answer_only("(3+3)*4")) and not verify(d, answer_only("(3+4)*3+3"))
    assert not verify(d, answer_only("3*(4+4)"))


def test_speedrun_training_mix_never_contains_an_eval_problem() -> None:
    from xinzhou.cli import RECIPES

    r = RECIPES["tiny"]
    train_text = set(tasks.pretrain_text(0, r.pretrain_docs, max(r.pretrain_drills, 300),
                                         key_scans=max(r.pretrain_key_scans, 300)))  # with its key-scan drills
    train_text |= set(tasks.drill_text(1, max(r.sft_drills, 300)))  # the SFT mix's drills (speedrun: seed + 1)
    train_text |= set(countdown.step_drills(0, max(r.sft_step_drills, 300)))  # and its search-step drills
    train_text |= set(countdown.check_drills(0, max(r.sft_check_drills, 300)))  # and its search-check drills
    train_text |= set(recall.check_drills(0, max(r.sft_key_checks, 300)))  # and its key-check drills
    train_text |= set(recall.scan_drills(0, max(r.sft_key_scans, 300)))  # and its key-scan drills
    for family, n in r.sft_mix.items():
        train = generate(family, "train", n, 0)
        spec = next(lv for lv in LEVELS.values() if lv.family == family)
        held_out = generate(family, "test", spec.n, 0, **spec.params)
        assert {s.meta["key"] for s in train}.isdisjoint(s.meta["key"] for s in held_out), family
        prompts = {user_text(s) for s in held_out}
        assert prompts.isdisjoint(user_text(s) for s in train), family
        # a held-out problem as a whole: "Make 17 from 9 2 1" is not in "Make 17 from 9 2 10"
        bounded = [re.compile(("(?<!\\d)" if p[0].isdigit() else "") + re.escape(p) + ("(?!\\d)" if p[-1].isdigit() else ""))
                   for p in prompts]
        assert not any(b.search(doc) for b in bounded for doc in train_text if family != "retrieval"), family
        assert bounded[0].search("x" + next(iter(prompts)) + "\n")  # (the pattern finds a problem that is there)


def test_evaluate_values_and_errors() -> None:
    assert countdown.evaluate("(3+5)*4") == (32, [3, 5, 4])
    assert countdown.evaluate("2+3*4-1") == (13, [2, 3, 4, 1])
    assert countdown.evaluate("((7))") == (7, [7])
    for junk in ("", "1+", "(1", "1)", "1 2", "-1", "1/2", "2**3", "1e3", "x", "1" * 7, "(" * 300 + "1" + ")" * 300, "１+1"):
        with pytest.raises(ValueError):
            countdown.evaluate(junk)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789+-*() /x.\n")) | st.characters(), max_size=80))
def test_evaluate_rejects_junk_without_crashing(text: str) -> None:
    try:
        value, used = countdown.evaluate(text)
    except ValueError:
        return
    assert isinstance(value, int) and all(isinstance(x, int) for x in used)


expr_tree = st.recursive(
    st.integers(0, 999).map(lambda x: (str(x), x)),
    lambda sub: st.tuples(sub, st.sampled_from("+-*"), sub).map(
        lambda t: (f"({t[0][0]}){t[1]}({t[2][0]})",
                   t[0][1] + t[2][1] if t[1] == "+" else t[0][1] - t[2][1] if t[1] == "-" else t[0][1] * t[2][1])),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(expr_tree)
def test_evaluate_matches_tree(tree: tuple[str, int]) -> None:
    text, value = tree
    assert countdown.evaluate(text)[0] == value


# --- L4: tools -------------------------------------------------------------------------------------

def test_tool_samples_are_consistent() -> None:
    for s in generate("tools", "test", 200, seed=0):
        first, result, final = s.target
        assert s.tools == tools.TOOLS and first["reasoning_content"] and final["reasoning_content"]
        assert result["role"] == "tool" and result["tool_call_id"] == first["tool_calls"][0]["id"]
        fn = first["tool_calls"][0]["function"]
        assert tools.execute(fn["name"], fn["arguments"]) == result["content"] == s.answer
        assert tools.well_formed_call(gold_parsed(first), s.tools) and tools.correct_call(gold_parsed(first), s)
        assert tools.verify_answer(gold_parsed(final), s)
        assert not tools.verify_answer(answer_only(str(int(s.answer) + 1)), s)
        assert not tools.verify_answer(gold_parsed(first), s)  # the call turn is not an answer


def test_multi_step_tool_samples_run_through_the_agent_loop() -> None:
    """"total": two prices in one turn, their sum, the answer. A client that replays the gold turns
    through the real agent loop and tools reaches the answer in three model calls, each call's
    tool results being the real ones the gold conversation holds."""
    from xinzhou.agent import loop
    from xinzhou.agent.client import Client, ToolCall, ToolOutput, Turn

    samples = generate("tools", "test", 50, seed=0, kinds=("total",))
    assert len({s.messages[0]["content"] for s in samples}) == 50
    for s in samples:
        (i1, q1), (i2, q2) = s.meta["arguments"]["items"]
        assert int(s.answer) == q1 * tools.PRICES[i1] + q2 * tools.PRICES[i2]
        turns = [m for m in s.target if m["role"] == "assistant"]

        class Gold(Client):
            def complete(self, history, specs, system=None):
                results = [h.content for h in history if isinstance(h, ToolOutput)]
                want = [m["content"] for m in s.target if m["role"] == "tool"][:len(results)]
                assert results == want  # the real tools gave what the gold conversation says
                m = turns[sum(isinstance(h, Turn) for h in history)]
                return Turn(m["reasoning_content"], m["content"], [
                    ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls", [])])

        events = list(loop.run(Gold("", "gold"), s.messages[0]["content"], tools.task_tools(), max_steps=4))
        assert isinstance(events[-1], loop.Final) and events[-1].steps == 3
        assert verify(s, gold_parsed(turns[-1])) and not verify(s, answer_only(str(int(s.answer) + 1)))
    assert not {s.meta["key"] for s in samples} & {s.meta["key"] for s in generate("tools", "train", 500, 0,
                                                                                   kinds=("total",))}
    # the L4 set is unchanged by the new kind: its default draw has no multi-step questions
    assert all(s.meta["tool"] != "total" for s in generate("tools", "test", 200, seed=0))


def test_tool_implementations() -> None:
    assert tools.execute("calculator", {"a": 4821, "op": "*", "b": 37}) == "178377"
    assert tools.execute("calculator", {"a": 5, "op": "-", "b": 9}) == "-4"
    assert tools.execute("get_price", {"item": "apple", "quantity": 3}) == str(3 * tools.PRICES["apple"])
    assert tools.execute("get_price", {"item": "unicorn", "quantity": 3}).startswith("error: unknown item")
    assert tools.execute("rm", {}).startswith("error: unknown tool")
    assert tools.execute("calculator", {"a": "1", "op": "+", "b": 2}).startswith("error: argument 'a'")
    assert tools.execute("calculator", {"a": 10**13, "op": "*", "b": 2}).startswith("error")


def test_well_formed_call_rejects_bad_calls() -> None:
    offered = tools.TOOLS
    assert tools.well_formed_call(call("calculator", {"a": 1, "op": "+", "b": 2}), offered)
    assert tools.well_formed_call(call("calculator", '{"a": 1, "op": "+", "b": 2}'), offered)  # JSON string
    assert tools.well_formed_call(call("get_price", {"item": "pen", "quantity": 2}), offered)
    bad = [
        call("calculate", {"a": 1, "op": "+", "b": 2}),  # wrong tool name
        call("calculator", {"a": "1", "op": "+", "b": 2}),  # string for integer
        call("calculator", {"a": 1.5, "op": "+", "b": 2}),  # float for integer
        call("calculator", {"a": True, "op": "+", "b": 2}),  # bool is not an integer
        call("calculator", {"a": 1, "op": "/", "b": 2}),  # not in enum
        call("calculator", {"a": 1, "op": "+"}),  # missing required
        call("calculator", {"a": 1, "op": "+", "b": 2, "c": 3}),  # unknown argument
        call("get_price", {"item": 7, "quantity": 2}),
        call("get_price", "not json"),
        call("get_price", None),
        Parsed(tool_calls=[]),
        Parsed(tool_calls=[{"function": "calculator"}]),
        Parsed(tool_calls=["calculator"]),
    ]
    for p in bad:
        assert not tools.well_formed_call(p, offered), p
    assert not tools.well_formed_call(call("get_price", {"item": "pen", "quantity": 2}), offered[:1])


def test_correct_call_needs_right_tool_and_arguments() -> None:
    s = next(x for x in generate("tools", "test", 50, seed=0) if x.meta["tool"] == "calculator")
    args = s.meta["arguments"]
    assert tools.correct_call(call("calculator", dict(args)), s)
    assert not tools.correct_call(call("calculator", {**args, "a": args["a"] + 1}), s)
    assert not tools.correct_call(call("calculator", {**args, "a": float(args["a"])}), s)
    assert not tools.correct_call(call("get_price", {"item": "pen", "quantity": 2}), s)


# --- pretraining text ---------------------------------------------------------------------------------

def test_pretrain_text_deterministic_and_train_only() -> None:
    docs = pretrain_text(seed=0, n=300)
    assert docs == pretrain_text(seed=0, n=300) and docs != pretrain_text(seed=1, n=300)
    assert len(docs) == 300 and all(isinstance(d, str) and d for d in docs)
    sums = [m for d in docs if (m := re.fullmatch(r"(\d+)\+(\d+)=(\d+)", d))]
    assert sums and all(split_of(f"{a}+{b}") == "train" and int(a) + int(b) == int(c) for a, b, c in (m.groups() for m in sums))
    assert any(d.startswith("The ") and "code of" not in d for d in docs)  # plain filler text


def test_drills_answer_right_and_never_hold_a_level_problem() -> None:
    docs = tasks.drill_text(0, 600)
    assert docs == tasks.drill_text(0, 600) and docs != tasks.drill_text(1, 600)
    repeat, lookup = docs[0::2], docs[1::2]
    for d in repeat:
        lines = d.split("\n")
        assert 2 <= len(lines) <= 4 and len(set(lines)) == 1 and 3 <= len(lines[0].split()) <= 8
    for d in lookup:
        pairs, *qa = d.split("\n")
        table = dict(kv.split("=") for kv in pairs.split())
        questions = [line.split("? ") for line in qa]
        assert 7 <= len(table) <= 12 and len(qa) == 4 and questions[0][0] not in list(table)[-6:]
        assert all(table[k] == v for k, v in questions) and len({k for k, _ in questions}) == 4
    held_out = [user_text(s) for lv in (1, 5) for s in generate(LEVELS[lv].family, "test", LEVELS[lv].n, 0,
                                                                  **LEVELS[lv].params)]
    assert not any(p in d for p in held_out for d in docs)
    plain = tasks.plain_lookup_text(0, 300)
    assert plain == tasks.plain_lookup_text(0, 300) and plain != tasks.plain_lookup_text(1, 300)
    in_order = 0
    for d in plain:  # every key asked once more, in a random order, with its own value
        listed, asked = (line.split() for line in d.split("\n"))
        table, again = dict(zip(listed[0::2], listed[1::2])), list(zip(asked[0::2], asked[1::2]))
        assert 6 <= len(table) <= 12 and len(listed) == 2 * len(table) and sorted(again) == sorted(table.items())
        in_order += [k for k, _ in again] == list(table)
    assert in_order <= 3  # a random order of 6+ keys is the listed one once in 720 or less
    assert not any(p in d for p in held_out for d in plain)
    named = tasks.drill_text(0, 600, names=True)
    names = set(NAMES)
    assert not any(w in names for d in docs for w in re.findall(r"\w+", d))  # task words only by default
    used = Counter(w for d in named for w in re.findall(r"\w+", d) if w in names)
    assert len(used) == len(NAMES) and sum(used.values()) > 1000  # every name, in copies and lookup values
    assert all(len(set(d.split("\n"))) == 1 for d in named[0::2])
    assert not any(p in d for p in held_out for d in named)
    assert set(named[:30]) <= set(pretrain_text(0, 60, drills=30, drill_names=True))
    few = tasks.drill_text(0, 400, names=True, few_words=3)
    for d in few[0::2]:
        lines = d.split("\n")
        assert len(set(lines)) == 1 and 6 <= len(lines[0].split()) <= 10 and len(set(lines[0].split())) <= 3
    for d in few[1::2]:  # lookups are as without few_words
        pairs, *qa = d.split("\n")
        table = dict(kv.split("=") for kv in pairs.split())
        assert 7 <= len(table) <= 12 and all(table[k] == v for k, v in (line.split("? ") for line in qa))
    assert not any(p in d for p in held_out for d in few)
    assert set(tasks.drill_text(0, 30, few_words=3)) <= set(pretrain_text(0, 60, drills=30, drill_few_words=3))
    for bad in (1, 6, -2):
        with pytest.raises(ValueError, match=f"few_words must be 0 .off. or 2-5 .*got {bad}"):
            tasks.drill_text(0, 2, few_words=bad)
    mixed = pretrain_text(0, 60, drills=30, plain_lookups=20)
    assert len(mixed) == 110 and set(docs[:30]) <= set(mixed) and set(plain[:20]) <= set(mixed)
    assert pretrain_text(0, 60) == pretrain_text(0, 60, 0, 0)
