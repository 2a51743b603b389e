"""`xinzhou speedrun` end to end at a few steps: every stage runs and leaves its artifacts.
(The real tiny speedrun takes ~10 minutes; its numbers are in the README.)"""

import json

import torch

from xinzhou.cli import RECIPES, speedrun
from xinzhou.hf import load_hf
from xinzhou.tokenizer import Tokenizer


def test_speedrun_pipeline_end_to_end(tmp_path):
    small = RECIPES["tiny"].__class__(**{
        **RECIPES["tiny"].__dict__, "pretrain_docs": 300, "pretrain_steps": 3, "sft_steps": 3, "eval_n": 6,
        "sft_mix": dict(arithmetic=200, tools=60, recall=20, countdown=20, retrieval=5)})
    out = speedrun(small, str(tmp_path / "run"))
    for f in ("tokenizer/tokenizer.json", "data/pretrain/meta.json", "data/sft/meta.json", "pretrain/loss.png",
              "sft/loss.png", "sft/metrics.jsonl", "report.md", "levels.png", "levels.json"):
        assert (out / f).exists(), f
    levels = json.loads((out / "levels.json").read_text())
    assert [x["level"] for x in levels] == [1, 2, 3, 4, 5] and all(x["n"] == 6 for x in levels)
    assert "| L2 | arithmetic |" in (out / "report.md").read_text()
    model = load_hf(out / "sft" / "ckpt")
    tok = Tokenizer.load(out / "sft" / "ckpt" / "tokenizer.json")
    assert model.config.vocab_size == tok.vocab_size and model.config.eos_token_id == tok.eos_id
    sft_rows = (out / "sft" / "metrics.jsonl").read_text().splitlines()
    assert len(sft_rows) == 3 and torch.isfinite(torch.tensor(json.loads(sft_rows[-1])["loss"]))
