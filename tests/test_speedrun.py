"""`xinzhou speedrun` end to end at a few steps: every stage runs and leaves its artifacts.
(The real tiny speedrun's numbers and times are in the README.)"""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from xinzhou import tasks
from xinzhou.cli import RECIPES, recipe_label, speedrun
from xinzhou.hf import load_hf
from xinzhou.tokenizer import Tokenizer


def test_speedrun_pipeline_end_to_end(tmp_path):
    small = RECIPES["tiny"].__class__(**{
        **RECIPES["tiny"].__dict__, "pretrain_docs": 300, "pretrain_drills": 200, "sft_drills": 50, "sft_key_scans": 50,
        "pretrain_steps": 3, "sft_steps": 4, "eval_n": 6,
        "curve_points": 1, "curve_n": 3, "rl_steps": 1, "rl_prompts": 2, "rl_group": 2,
        "sft_mix": dict(arithmetic=200, tools=60, recall=20, countdown=20, retrieval=5)})
    out = speedrun(small, str(tmp_path / "run"))
    for f in ("tokenizer/tokenizer.json", "data/pretrain/meta.json", "data/sft/meta.json", "pretrain/loss.png",
              "sft/loss.png", "sft/metrics.jsonl", "rl/metrics.jsonl", "rl/rl.png", "report.md", "levels.png",
              "levels.json", "curve.png"):
        assert (out / f).exists(), f
    levels = json.loads((out / "levels.json").read_text())
    assert [x["level"] for x in levels] == [1, 2, 3, 4, 5] and all(x["n"] == 6 for x in levels)
    report = (out / "report.md").read_text()
    assert "| L2 | arithmetic |" in report
    # the RL stage starts from sft/ckpt, its checkpoint is the one reported, and the report gives L3
    # before RL (rl_train's score before its first step) and after (the report's own), same problems
    rows = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [-1, 0] and "pass_rate" not in rows[1]
    assert json.loads((out / "rl" / "run.json").read_text())["train"]["model"] == str(out / "sft" / "ckpt")
    assert f"checkpoint `{out / 'rl' / 'ckpt'}`" in report and "## RL stage" in report
    assert (f"Held-out L3 on the same 6 problems: {rows[0]['pass_rate']:.1%} after SFT, "
            f"{levels[2]['score']:.1%} after RL") in report
    before, after = rows[0]["outcomes"], levels[2]["outcomes"]  # paired: problem by problem
    assert len(before) == len(after) == 6 and rows[0]["pass_rate"] == before.count("1") / 6
    fixed = sum(a == "0" and b == "1" for a, b in zip(before, after))
    broken = sum(a == "1" and b == "0" for a, b in zip(before, after))
    assert f"; {fixed} problems solved that were not, {broken} no longer solved (exact McNemar p = " in report
    model = load_hf(out / "rl" / "ckpt")
    tok = Tokenizer.load(out / "rl" / "ckpt" / "tokenizer.json")
    assert model.config.vocab_size == tok.vocab_size and model.config.eos_token_id == tok.eos_id
    sft_rows = (out / "sft" / "metrics.jsonl").read_text().splitlines()
    # the curve: one point scored during SFT (step 2 of 4, n = 3) and the final report's
    points = json.loads((out / "curve.json").read_text())
    assert [(c["step"], c["n"]) for c in points] == [(2, 3), (4, 6)] and points[1]["rl_steps"] == 1
    assert "| 4 + RL 1 | " in report
    assert points[0]["minutes"] < points[1]["minutes"] and list(points[1]["scores"]) == ["L1", "L2", "L3", "L4", "L5"]
    assert points[1]["scores"]["L2"] == levels[1]["score"]
    assert "## Levels against wall-clock minutes" in (out / "report.md").read_text()
    assert len(sft_rows) == 4 and torch.isfinite(torch.tensor(json.loads(sft_rows[-1])["loss"]))


def test_data_command_builds_shards_from_user_files(tmp_path):
    from xinzhou.cli import main
    from xinzhou.data import PackedLoader
    from xinzhou.tokenizer import train_tokenizer

    tok = train_tokenizer(["hello world " * 5, "the heart-boat sails"] * 20, vocab_size=300)
    tok_path = tok.save(tmp_path / "tok")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world\n\nthe heart-boat sails")
    (corpus / "b.jsonl").write_text(json.dumps({"text": "plain"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    main(["data", str(corpus), "--tokenizer", str(tok_path), "--out", str(tmp_path / "sh"), "--paragraphs"])
    meta = json.loads((tmp_path / "sh" / "meta.json").read_text())
    assert meta["n_docs"] == 4  # two paragraphs, one text record, one chat record
    x, y = PackedLoader(tmp_path / "sh", seq_len=64, batch_size=1).next_batch()
    assert (y != -100).sum() > 0


def test_speedrun_refuses_task_params_for_a_family_not_in_the_mix(tmp_path):
    r = dataclasses.replace(RECIPES["tiny"], sft_task_params={"recal": {"thinking": "scan"}})
    with pytest.raises(ValueError, match=r"sft_task_params names \['recal'\]"):
        speedrun(r, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def shard_text(run: Path, stage: str) -> str:
    """The whole text of a speedrun's packed shards of `stage`, decoded with the run's tokenizer."""
    meta = json.loads((run / "data" / stage / "meta.json").read_text())
    ids = np.fromfile(run / "data" / stage / "tokens.bin", dtype=meta["dtype"]).tolist()
    return Tokenizer.load(run / "tokenizer" / "tokenizer.json").decode(ids)


def test_speedrun_recipe_options_reach_both_stages(tmp_path):
    # Muon in both stages, a gentler Muon rate for SFT, copying drills in both mixes
    r = RECIPES["tiny"].__class__(**{
        **RECIPES["tiny"].__dict__, "pretrain_docs": 120, "pretrain_drills": 40, "pretrain_steps": 2, "sft_steps": 2,
        "eval_n": 2, "curve_points": 0, "optimizer": "muon", "muon_lr": 0.03, "sft_muon_lr": 0.004, "rl_steps": 0,
        "sft_mix": dict(arithmetic=200, recall=20), "sft_drills": 30, "pretrain_plain_lookups": 10,
        "sft_plain_lookups": 20, "sft_check_drills": 25, "sft_key_checks": 10, "sft_key_scans": 15, "pretrain_key_scans": 12, "lookup_steps": 2, "lookup_drills": 300, "sft_task_params": {"recall": {"thinking": "scan"}}})
    out = speedrun(r, str(tmp_path / "run"))
    # the lookup stage trains on plain lookups only, and pretraining starts from its checkpoint
    lookups = json.loads((out / "lookups" / "run.json").read_text())["train"]
    assert lookups["steps"] == 2 and lookups["data"].endswith("lookups")
    assert json.loads((out / "data" / "lookups" / "meta.json").read_text())["n_docs"] == 300
    pre = json.loads((out / "pretrain" / "run.json").read_text())["train"]
    assert pre["init_from"] == str(out / "lookups" / "ckpt")
    sft = json.loads((out / "sft" / "run.json").read_text())["train"]
    assert (pre["optimizer"], pre["muon_lr"]) == ("muon", 0.03) and (sft["optimizer"], sft["muon_lr"]) == ("muon", 0.004)
    assert json.loads((out / "data" / "pretrain" / "meta.json").read_text())["n_docs"] == 182
    pre_text = shard_text(out, "pretrain")
    assert all(doc in pre_text for doc in tasks.recall.scan_drills(1, 12))  # key scans, other lists than SFT's
    assert not any(doc in pre_text for doc in tasks.recall.scan_drills(0, 15))
    assert json.loads((out / "data" / "sft" / "meta.json").read_text())["n_docs"] == 320
    assert "muon" in (out / "report.md").read_text() and not (out / "rl").exists()
    assert "## RL stage" not in (out / "report.md").read_text()
    # the recall samples' params reached the SFT data: a key lookup's thinking scans the list
    text = shard_text(out, "sft")
    scans = re.findall(r"<think>\n((?:[a-z]:[a-z]=\w+ )*)([a-z]):\2=\w+\n</think>", text)
    assert scans and all(w[0] != asked and w[2] == asked for before, asked in scans for w in before.split())
    # the SFT mix keeps plain lookups (other drills than the stage's), at the recipe's 3-6 pairs
    kept = tasks.plain_lookup_text(3, 20, r.plain_lookup_pairs)
    assert all(doc in text for doc in kept) and not any(doc in text for doc in tasks.plain_lookup_text(2, 300, (3, 6)))
    assert all(doc in text for doc in tasks.countdown.check_drills(0, 25))  # and the search-check drills
    assert all(doc in text for doc in tasks.recall.check_drills(0, 10) + tasks.recall.scan_drills(0, 15))  # key drills


def test_recipe_label_names_the_preset_a_recipe_equals():
    assert recipe_label(RECIPES["tiny"]) == "tiny, muon"
    assert recipe_label(dataclasses.replace(RECIPES["tiny"])) == "tiny, muon"  # an equal copy is the preset
    assert recipe_label(dataclasses.replace(RECIPES["tiny"], sft_steps=7)) == "custom, muon"
    assert recipe_label(dataclasses.replace(RECIPES["tiny"], doc_mask=False), "mine") == "mine, no document masking, muon"
