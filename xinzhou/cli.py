"""The `xinzhou` command.

    xinzhou speedrun                      # tokenizer -> curriculum -> pretrain -> SFT [-> RL] -> capability report (CPU, tiny)
    xinzhou speedrun --preset small       # the same at the 306.8M shape (GPU)
    xinzhou eval runs/speedrun/sft/ckpt   # capability report of any checkpoint with a tokenizer.json
    xinzhou eval --endpoint http://127.0.0.1:8000 --served-name ckpt --out eval/ [--compare old/levels.json]
                                          # the same report through any server, in any protocol
    xinzhou data corpus/ --tokenizer runs/speedrun/tokenizer/tokenizer.json --out data/mine
                                          # user files (txt, jsonl, parquet) -> shards for xinzhou.train
    xinzhou rl --model runs/speedrun/sft/ckpt --task countdown --loss cispo --out runs/rl
                                          # RL on a task family's verifier (CISPO, DAPO or GRPO)
    xinzhou serve --model runs/speedrun/sft/ckpt [--port 8000] [--api-key K]
                                          # OpenAI Chat Completions, Responses and Anthropic Messages on one model
    xinzhou agent --endpoint http://127.0.0.1:8000 --protocol anthropic --workspace work/ --task "..."
                                          # the interleaved-thinking agent against any endpoint

A speedrun writes into --out: tokenizer/, data/, pretrain/ and sft/ (each with metrics.jsonl,
loss.png and ckpt/), rl/ when the recipe has an RL stage (metrics.jsonl, rl.png, ckpt/), report.md,
levels.png, and curve.png with curve.json (level scores against wall-clock minutes, scored during
SFT and at the end). The final checkpoint is rl/ckpt (sft/ckpt without an RL stage): a Hugging Face
directory that transformers loads.

Errors in the input (a missing checkpoint, a malformed file, an output path that holds files
xinzhou did not write) are printed as `xinzhou: error: <what, where>` with exit status 1;
`--debug` shows the Python traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xinzhou import rl_train, tasks
from xinzhou.chat_format import render_text
from xinzhou.config import ModelConfig, preset
from xinzhou.data import read_corpus, tokenize_docs, write_shards
from xinzhou.errors import CheckpointError, DataError, OutputError, cli_errors
from xinzhou.evals import capability_report, paired_change, plot_levels, report_markdown
from xinzhou.hf import load_hf
from xinzhou.tokenizer import Tokenizer, train_tokenizer
from xinzhou.train import TrainConfig, _read_metrics, check_run_dir, train


@dataclass(frozen=True, kw_only=True)
class Recipe:
    model: dict  # preset name + overrides
    vocab_size: int
    pretrain_docs: int
    sft_mix: dict  # family -> number of training samples
    tool_turns: int  # tool samples chained per SFT conversation (the tools section is paid once)
    seq_len: int  # pretraining
    batch_size: int
    sft_seq_len: int
    sft_batch_size: int
    pretrain_steps: int
    sft_steps: int
    pretrain_lr: float
    sft_lr: float
    eval_n: int
    curve_points: int = 0  # evaluations during SFT (at n = curve_n) for the curve of levels against minutes
    curve_n: int = 50
    doc_mask: bool = True  # each document of a packed window on its own (TrainConfig.doc_mask)
    pretrain_drills: int = 0  # copying drills added to the pretraining documents (tasks.drill_text)
    drill_names: bool = False  # drills (pretraining's and SFT's) copy L5's person names too
    drill_few_words: int = 0  # repeat drills of lines drawn from this many words, so a copy must keep its place
    pretrain_plain_lookups: int = 0  # lookup drills without a separator added to them (tasks.plain_lookup_text)
    lookup_steps: int = 0  # a stage before pretraining on nothing but lookup_drills plain lookups
    lookup_drills: int = 0  # (experiments/induction: lookups form there and not when mixed into pretraining)
    plain_lookup_pairs: tuple[int, int] = (3, 6)  # pairs per plain lookup drill, in the stage, pretraining and SFT
    sft_drills: int = 0  # copying drills kept in the SFT mix (plain text, all learned), so SFT keeps the circuit
    sft_plain_lookups: int = 0  # plain lookup drills kept in the SFT mix, so SFT keeps the match (as sft_drills)
    sft_step_drills: int = 0  # documents of countdown search steps in the SFT mix (countdown.step_drills); at
    # 4,000 the steps got more exact and L3 did not follow in two of three seeds (docs/levels-log.md)
    sft_check_drills: int = 0  # documents of balanced search checks ("9*4=36:36 yes") in the SFT mix
    # (countdown.check_drills); at 3,000 every seed's checks came right, L3 rose in one seed of three and
    # fell in two, and L1 fell in all three (docs/levels-log.md)
    sft_key_checks: int = 0  # documents of balanced key checks (" c: f no=ocean q: q yes=mango") in the SFT mix
    # (recall.check_drills), for key lookups that think "check" (sft_task_params recall thinking)
    pretrain_key_scans: int = 0  # the same documents (other lists) in pretraining instead; at 6,000 (seed 0) the
    # lookups wrote their verdicts and answered words of no pair: key lookups 1% (docs/levels-log.md)
    sft_key_scans: int = 0  # documents of whole key-check scans of a list in the SFT mix (recall.scan_drills), for
    # key lookups that think "check"; L1 reaches 90% in some runs and not others (docs/levels-log.md)
    optimizer: str = "adamw"  # TrainConfig.optimizer: "muon" puts the hidden matrices on Muon at muon_lr
    muon_lr: float = 0.02
    sft_muon_lr: float | None = None  # the Muon rate of the SFT stage (None: muon_lr); a gentle SFT keeps what
    # pretraining formed (experiments/induction: copying survives SFT at 0.002 and is erased at 0.02)
    rl_steps: int = 0  # CISPO steps on rl_task's verifier after SFT (xinzhou.rl_train); 0: no RL stage
    rl_task: str = "countdown"
    rl_prompts: int = 16  # problems per RL step, rl_group rollouts each
    rl_group: int = 8
    rl_lr: float = 1e-5  # experiments/cispo: +5 points on countdown in 16 steps, paired p < 0.05 (2e-5: p 0.07-0.2)
    sft_task_params: dict = field(default_factory=dict)  # family -> generate() params of its SFT samples,
    # e.g. {"recall": {"thinking": "scan"}} (the held-out problems are the same whatever they are)


RECIPES = {
    # ~10 minutes on 2 CPU cores. Full rotary (rotary_dim = head_dim) so that transformers' MiniMax,
    # which rotates the whole head, computes the same logits from the checkpoint.
    # Muon forms copying from the drills in pretraining; SFT keeps it with drills in its mix and rates a
    # third (AdamW) and a quarter (Muon) of pretraining's (experiments/induction/README.md). Key lookups think
    # "check" and learn it from whole scans of lists; the tools share of the mix is smaller so that countdown
    # and the scans fit (docs/levels-log.md).
    "tiny": Recipe(model=dict(name="tiny", hidden_size=128, head_dim=32, rotary_dim=32, expert_dim=256,
                              layer_types=("lightning", "softmax", "lightning", "softmax")),
                   vocab_size=1024, pretrain_docs=6000, pretrain_drills=12000,
                   sft_mix=dict(arithmetic=12000, tools=6000, recall=8000, countdown=6500, retrieval=2000),
                   sft_task_params={"recall": {"thinking": "check"}}, sft_key_scans=6000,
                   sft_drills=4000, tool_turns=3, seq_len=256, batch_size=16, sft_seq_len=512, sft_batch_size=8,
                   pretrain_steps=300, sft_steps=1300, pretrain_lr=3e-3, sft_lr=1e-3, eval_n=200,
                   curve_points=3, optimizer="muon", muon_lr=0.02, sft_muon_lr=0.005),
    # the 306.8M benchmark shape; for a GPU
    "small": Recipe(model=dict(name="small"), vocab_size=8192, pretrain_docs=200000,
                    sft_mix=dict(arithmetic=100000, tools=30000, recall=20000, countdown=20000, retrieval=5000),
                    tool_turns=3, seq_len=1024, batch_size=32, sft_seq_len=1024, sft_batch_size=32, pretrain_steps=2000, sft_steps=3000, pretrain_lr=1e-3,
                    sft_lr=5e-4, eval_n=200, curve_points=4, curve_n=100),
}


def _log(msg: str) -> None:
    print(f"[xinzhou {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def recipe_label(r: Recipe, name: str | None = None) -> str:
    """The report's name of a recipe: the given name, else the preset it equals, else "custom";
    then what sets it apart (no document masking) and its optimizer."""
    label = name or next((k for k, v in RECIPES.items() if v == r), "custom")
    if not r.doc_mask:
        label += ", no document masking"
    return label + f", {r.optimizer}"


def speedrun(recipe: str | Recipe = "tiny", out: str = "runs/speedrun", seed: int = 0, name: str | None = None) -> Path:
    if isinstance(recipe, str) and recipe not in RECIPES:
        raise SystemExit(f"unknown preset {recipe!r}: expected one of {list(RECIPES)}")
    r = RECIPES[recipe] if isinstance(recipe, str) else recipe
    recipe_name = recipe_label(r, name)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is a file; --out must be a directory")
    unknown = sorted(set(r.sft_task_params) - set(r.sft_mix))
    if unknown:
        raise ValueError(f"sft_task_params names {unknown}, which the SFT mix {sorted(r.sft_mix)} does not have")
    stages = (("lookups",) if r.lookup_steps else ()) + ("pretrain", "sft") + (("rl",) if r.rl_steps else ())
    for stage in stages:  # refuse before minutes of work, not after
        check_run_dir(out_dir / stage)
    total = 5 + bool(r.rl_steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    random.seed(seed)
    torch.manual_seed(seed)

    _log(f"1/{total} curriculum: generating task conversations")
    pretrain_texts = tasks.pretrain_text(seed, r.pretrain_docs, r.pretrain_drills, r.pretrain_plain_lookups,
                                         r.plain_lookup_pairs, r.pretrain_key_scans,
                                         drill_names=r.drill_names, drill_few_words=r.drill_few_words)
    sft = []
    for family, n in r.sft_mix.items():
        samples = tasks.generate(family, "train", n, seed, **r.sft_task_params.get(family, {}))
        k = r.tool_turns if family == "tools" else 1
        for i in range(0, len(samples), k):  # several questions share one conversation
            group = samples[i:i + k]
            # every turn keeps the thinking it was generated with, and is trained
            sft.append(dict(messages=[m for s in group for m in tasks.conversation(s)], tools=group[0].tools,
                            keep_all_thinking=True))
    # other drills than pretraining's
    sft += tasks.drill_text(seed + 1, r.sft_drills, names=r.drill_names, few_words=r.drill_few_words)
    sft += tasks.plain_lookup_text(seed + 3, r.sft_plain_lookups, r.plain_lookup_pairs)  # nor the stage's
    sft += tasks.countdown.step_drills(seed, r.sft_step_drills)
    sft += tasks.countdown.check_drills(seed, r.sft_check_drills)
    sft += tasks.recall.check_drills(seed, r.sft_key_checks)
    sft += tasks.recall.scan_drills(seed, r.sft_key_scans)
    random.Random(seed).shuffle(sft)

    _log(f"2/{total} tokenizer: byte-level BPE, vocab {r.vocab_size}")
    chat_texts = [render_text(c["messages"], c["tools"], keep_all_thinking=True) for c in sft[:3000]
                  if isinstance(c, dict)]  # (not the drills: plain text)
    tok = train_tokenizer(pretrain_texts + chat_texts, r.vocab_size)
    tok_path = tok.save(out_dir / "tokenizer")
    tok = Tokenizer.load(tok_path)

    _log(f"3/{total} data: tokenized, packed shards")
    write_shards(tokenize_docs(pretrain_texts, tok), out_dir / "data" / "pretrain", tok.vocab_size, "tasks.pretrain_text")
    write_shards(tokenize_docs(sft, tok), out_dir / "data" / "sft", tok.vocab_size, "tasks SFT mix")
    if r.lookup_steps:
        write_shards(tokenize_docs(tasks.plain_lookup_text(seed + 2, r.lookup_drills, r.plain_lookup_pairs), tok),
                     out_dir / "data" / "lookups", tok.vocab_size, "tasks.plain_lookup_text")

    spec = dict(r.model)
    model_cfg: ModelConfig = preset(spec.pop("name"), vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                    eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **spec)
    common = dict(seed=seed, tokenizer=str(tok_path), doc_mask=r.doc_mask, optimizer=r.optimizer, muon_lr=r.muon_lr)
    _log(f"4/{total} pretrain ({model_cfg.num_params() / 1e6:.2f}M params) then SFT")
    start = None
    if r.lookup_steps:
        start = str(train(model_cfg, TrainConfig(data=str(out_dir / "data" / "lookups"), out_dir=str(out_dir / "lookups"),
                                                 steps=r.lookup_steps, lr=r.pretrain_lr, seq_len=r.seq_len,
                                                 batch_size=r.batch_size, **common)))
    pre = train(model_cfg, TrainConfig(data=str(out_dir / "data" / "pretrain"), out_dir=str(out_dir / "pretrain"),
                                       steps=r.pretrain_steps, lr=r.pretrain_lr, seq_len=r.seq_len,
                                       batch_size=r.batch_size, init_from=start, **common))
    curve: list[dict] = []
    every = r.sft_steps // (r.curve_points + 1) if r.curve_points else 0

    def score_during_sft(step: int, model: torch.nn.Module) -> None:
        if every and step % every == 0 and step < r.sft_steps and len(curve) < r.curve_points:
            curve.append(curve_point(model, tok, step, t0, r.curve_n))
            _log(f"  SFT step {step}: " + " ".join(f"{k} {v:.0%}" for k, v in curve[-1]["scores"].items()))

    final = train(model_cfg, TrainConfig(data=str(out_dir / "data" / "sft"), out_dir=str(out_dir / "sft"),
                                         steps=r.sft_steps, lr=r.sft_lr, init_from=str(pre), warmup_steps=10,
                                         seq_len=r.sft_seq_len, batch_size=r.sft_batch_size,
                                         **(common | dict(muon_lr=r.sft_muon_lr or r.muon_lr))),
                  on_step=score_during_sft)
    sft_done = (time.time() - t0) / 60

    rl_cfg = None
    if r.rl_steps:
        _log(f"5/{total} RL: CISPO on {r.rl_task}, {r.rl_steps} steps of {r.rl_prompts} problems x {r.rl_group} rollouts")
        rl_cfg = rl_train.RLConfig(model=str(final), out_dir=str(out_dir / "rl"), task=r.rl_task, loss="cispo",
                                   steps=r.rl_steps, prompts_per_step=r.rl_prompts, group_size=r.rl_group,
                                   lr=r.rl_lr, eval_every=0, eval_n=r.eval_n, seed=seed)
        final = rl_train.rl_train(rl_cfg)
    trained = (time.time() - t0) / 60

    _log(f"{total}/{total} capability report on held-out tasks")
    results = report(final, out_dir, n=r.eval_n)
    minutes = (time.time() - t0) / 60
    curve.append(dict(step=r.sft_steps, rl_steps=r.rl_steps, minutes=trained, n=r.eval_n, scores=level_scores(results)))
    thresholds = {f"L{x.level}": x.threshold for x in results}
    text = (out_dir / "report.md").read_text()
    text = text.replace("\n\n", f"\n\nSpeedrun `{recipe_name}` in {minutes:.1f} min; checkpoint `{final}`.\n\n", 1)
    if rl_cfg is not None:
        text += rl_markdown(rl_cfg, out_dir / "rl", results, trained - sft_done)
    text += curve_markdown(curve, thresholds)
    (out_dir / "report.md").write_text(text)
    (out_dir / "curve.json").write_text(json.dumps(curve, indent=2))
    plot_curve(curve, thresholds, out_dir / "curve.png")
    _log(f"done in {minutes:.1f} min: {out_dir / 'report.md'}")
    for res in results:
        _log(f"  L{res.level} {res.family:<10} {res.metric:<10} {res.score:6.1%} (threshold {res.threshold:.0%}, "
             f"{'reached' if res.passed else 'not reached'})")
    return out_dir


REPORT_TITLE = "# Capability report"


def curve_point(model: torch.nn.Module, tok: Tokenizer, step: int, t0: float, n: int) -> dict:
    """Level scores of the model being trained (n held-out samples per level), at `step`, with the
    speedrun's wall-clock minutes when the scoring began."""
    from xinzhou.evals import local_client

    minutes = (time.time() - t0) / 60
    with local_client(model, tok) as client:
        results = capability_report(client, n=n)
    return dict(step=step, minutes=minutes, n=n, scores=level_scores(results))


def rl_markdown(cfg: rl_train.RLConfig, rl_dir: Path, results: list, minutes: float) -> str:
    """The RL stage's section of the report: its level's held-out score before RL (rl_train scores
    it before the first step) and after (the report's, on the same problems)."""
    level = next(x for x in results if x.family == cfg.task)
    first = next(row for row in _read_metrics(rl_dir / "metrics.jsonl") if row["step"] == -1)
    fixed, broken, p = paired_change(first["outcomes"], level.outcomes)
    return ("\n## RL stage\n\n"
            f"CISPO on {cfg.task} (L{level.level}) after SFT: {cfg.steps} steps of {cfg.prompts_per_step} training "
            f"problems x {cfg.group_size} rollouts, {cfg.updates_per_step} minibatch updates each, lr {cfg.lr:g}, "
            f"{minutes:.1f} min. Held-out L{level.level} on the same {level.n} problems: {first['pass_rate']:.1%} "
            f"after SFT, {level.score:.1%} after RL; {fixed} problems solved that were not, {broken} no longer "
            f"solved (exact McNemar p = {p:.2g}). Per step: `rl/metrics.jsonl`, `rl/rl.png`.\n")


def level_scores(results: list) -> dict[str, float]:
    return {f"L{x.level}": x.score for x in results}


def curve_markdown(curve: list[dict], thresholds: dict[str, float]) -> str:
    levels = list(thresholds)
    lines = ["", "## Levels against wall-clock minutes", "",
             "Scores during SFT (the last row is the report above, after the RL stage when there is one); "
             "minutes since the speedrun began, the scoring of earlier points included.", "",
             "| SFT step | minutes | n | " + " | ".join(levels) + " |", "|---" * (3 + len(levels)) + "|"]
    for c in curve:
        step = f"{c['step']} + RL {c['rl_steps']}" if c.get("rl_steps") else str(c["step"])
        lines.append(f"| {step} | {c['minutes']:.1f} | {c['n']} | "
                     + " | ".join(f"{c['scores'][k]:.1%}" for k in levels) + " |")
    lines.append("| threshold | | | " + " | ".join(f"{thresholds[k]:.0%}" for k in levels) + " |")
    return "\n".join(lines) + "\n"


def plot_curve(curve: list[dict], thresholds: dict[str, float], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for i, (level, threshold) in enumerate(thresholds.items()):
        color = f"C{i}"
        ax.plot([c["minutes"] for c in curve], [c["scores"][level] for c in curve], "o-", color=color, label=level)
        ax.axhline(threshold, color=color, linestyle=":", linewidth=1)
    ax.set(xlabel="wall-clock minutes", ylabel="held-out score", ylim=(-0.02, 1.05),
           title="capability levels during training (dotted: thresholds)")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def load_tokenizer(path: Path) -> Tokenizer:
    """Tokenizer.load with the project's error types (the file, and what is wrong with it)."""
    try:
        return Tokenizer.load(path)
    except FileNotFoundError as e:
        raise DataError(f"{path}: no tokenizer.json there (a speedrun writes one into every checkpoint)") from e
    except ValueError as e:
        raise DataError(str(e)) from e


def check_report_dir(out_dir: Path) -> None:
    """report.md, levels.json and levels.png are overwritten only when they are an earlier report."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is a file; the report goes into a directory")
    md, js, png = out_dir / "report.md", out_dir / "levels.json", out_dir / "levels.png"
    ours = md.is_file() and md.read_text(errors="replace").startswith(REPORT_TITLE)
    for f in (md, js, png):
        if f.exists() and not ours:
            raise OutputError(f"{f}: exists and is not a xinzhou capability report; choose another --out")


def report(ckpt: Path | None, out_dir: Path, n: int = 200, endpoint: str | None = None, protocol: str = "openai",
           served_name: str = "xinzhou", api_key: str = "none", compare: Path | None = None,
           previous: list | None = None) -> list:
    """The capability report of a checkpoint (run here, greedy) or of an endpoint (any protocol,
    temperature 0): report.md, levels.json and levels.png in out_dir; with `compare`, an earlier
    levels.json read as `previous`, the change per level goes into report.md too."""
    from xinzhou.agent.client import make_client
    from xinzhou.evals import EVAL_MAX_TOKENS, compare_markdown, local_client, to_json

    if n < 1:
        raise ValueError(f"n = {n}: the report needs at least one held-out sample per level")
    check_report_dir(out_dir)
    if endpoint is not None:
        client = make_client(protocol, endpoint, served_name, api_key=api_key, temperature=0.0,
                             max_tokens=EVAL_MAX_TOKENS)
        source = f"Endpoint `{endpoint}` ({protocol}, model `{served_name}`)"
    else:
        model = load_hf(ckpt, device="cuda" if torch.cuda.is_available() else "cpu")
        tok = load_tokenizer(ckpt / "tokenizer.json")
        if tok.vocab_size > model.config.vocab_size:
            raise CheckpointError(f"{ckpt}: tokenizer.json has {tok.vocab_size} tokens, the model only "
                                  f"{model.config.vocab_size}: not this checkpoint's tokenizer")
        client = local_client(model, tok)
        source = f"Checkpoint `{ckpt}`"
    try:
        results = capability_report(client, n=n)
    finally:
        client.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    text = f"{REPORT_TITLE}\n\n{source}, held-out samples, greedy decoding.\n\n" + report_markdown(results)
    if previous is not None:
        text += f"\n## Change from `{compare}`\n\n" + compare_markdown(results, previous)
    _write_text(out_dir / "report.md", text)
    _write_text(out_dir / "levels.json", json.dumps(to_json(results), indent=2))
    plot_levels(results, str(out_dir / "levels.png"))
    return results


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _at_least(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{n}: must be at least {minimum}")
        return n
    return parse


_positive, _nonnegative = _at_least(1), _at_least(0)


def _check_inputs_not_output(inputs: list[str], out: str) -> None:
    o = Path(out).resolve()
    for i in inputs:
        p = Path(i).resolve()
        if p == o or o in p.parents:
            raise OutputError(f"--out {out} would replace the input {i}: write the shards somewhere else")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="xinzhou")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speedrun", parents=[common],
                       help="tokenizer -> curriculum -> pretrain -> SFT [-> RL with --rl-steps] -> capability report")
    s.add_argument("--preset", default="tiny", choices=sorted(RECIPES))
    s.add_argument("--out", default="runs/speedrun")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-doc-mask", action="store_true",
                   help="let each document of a packed training window see the ones before it (the old way)")
    s.add_argument("--optimizer", choices=["adamw", "muon"], default=None,
                   help="override the recipe's optimiser (muon: Muon for the hidden matrices, AdamW for the rest)")
    s.add_argument("--rl-steps", type=_nonnegative, default=None,
                   help="CISPO steps on countdown after SFT (0: no RL stage; default: the recipe's)")
    e = sub.add_parser("eval", parents=[common], help="capability report of a checkpoint or of an endpoint")
    e.add_argument("ckpt", nargs="?", default=None, help="checkpoint directory with tokenizer.json (or --model)")
    e.add_argument("--model", default=None, help="checkpoint directory with tokenizer.json (runs here)")
    e.add_argument("--endpoint", default=None, help="base URL of a server, e.g. http://127.0.0.1:8000")
    e.add_argument("--protocol", choices=["openai", "responses", "anthropic"], default="openai")
    e.add_argument("--served-name", default="xinzhou", help="the model name the endpoint serves")
    e.add_argument("--api-key", default=None, help="default: $XINZHOU_API_KEY, else 'none'")
    e.add_argument("--out", default=None, help="where report.md, levels.json and levels.png go "
                   "(default: the checkpoint's parent directory; needed with --endpoint)")
    e.add_argument("--compare", default=None, help="an earlier levels.json: the change per level")
    e.add_argument("-n", type=_positive, default=200, help="held-out samples per level")
    d = sub.add_parser("data", parents=[common], help="tokenize corpora (txt, jsonl, parquet files or folders) into packed shards")
    d.add_argument("inputs", nargs="+")
    d.add_argument("--tokenizer", required=True, help="tokenizer.json (or a folder with one)")
    d.add_argument("--out", required=True)
    d.add_argument("--paragraphs", action="store_true", help=".txt: one document per blank-line-separated paragraph")
    v = sub.add_parser("serve", parents=[common], help="serve a checkpoint over OpenAI and Anthropic protocols")
    v.add_argument("--model", required=True, help="checkpoint directory with tokenizer.json")
    v.add_argument("--host", default="127.0.0.1", help="another address needs --api-key")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", default=None, help="required on every route but /health when given")
    v.add_argument("--served-name", default=None, help="the model name clients ask for (default: the folder's name)")
    v.add_argument("--max-batch", type=_positive, default=16, help="concurrent requests in the engine")
    c = sub.add_parser("chat", parents=[common], help="a terminal chat with a checkpoint or an endpoint")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory with tokenizer.json (runs here)")
    src.add_argument("--endpoint", help="base URL of an OpenAI-compatible server")
    c.add_argument("--served-name", default="xinzhou", help="the model name, with --endpoint")
    c.add_argument("--temperature", type=float, default=1.0)
    c.add_argument("--max-tokens", type=_positive, default=512)
    a = sub.add_parser("agent", parents=[common], help="the interleaved-thinking agent against an endpoint")
    a.add_argument("--endpoint", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    a.add_argument("--protocol", choices=["openai", "responses", "anthropic"], default="openai")
    a.add_argument("--model", default="xinzhou", help="the model name the endpoint serves")
    a.add_argument("--api-key", default=None, help="default: $XINZHOU_API_KEY, else 'none'")
    a.add_argument("--workspace", default=".", help="the directory the tools are confined to")
    a.add_argument("--task", default=None, help="one task to completion; without it, interactive")
    a.add_argument("--max-steps", type=_positive, default=8)
    a.add_argument("--drop-thinking", action="store_true", help="do not send earlier thinking back (ablation)")
    r = sub.add_parser("rl", parents=[common], help="RL (CISPO, DAPO, GRPO) on a task family's verifier")
    rl_train.add_arguments(r)
    args = p.parse_args(argv)
    if args.cmd == "rl":
        try:
            rl_cfg = rl_train.config_from_args(args)
        except ValueError as e:
            r.error(str(e))
        with cli_errors(args.debug):
            rl_train.rl_train(rl_cfg)
        return
    with cli_errors(args.debug):
        _run(args)


def _chat(args: argparse.Namespace) -> None:
    """Read a line, stream the reply (thinking dimmed, tool calls shown), keep the conversation."""
    from xinzhou.chat_format import ContentDelta, ReasoningDelta, StreamParser, ToolCallEnd, render
    from xinzhou.engine import Engine, Finished, SamplingParams, Token

    dim, reset = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
    messages: list[dict] = []
    if args.endpoint:
        from xinzhou.agent.client import Turn, make_client
        client = make_client("openai", args.endpoint, args.served_name, temperature=args.temperature,
                             max_tokens=args.max_tokens)
        history: list = []
    else:
        ckpt = Path(args.model)
        if not ckpt.is_dir():
            raise CheckpointError(f"{ckpt}: no such checkpoint directory")
        model = load_hf(ckpt, device="cuda" if torch.cuda.is_available() else "cpu").eval()
        tok = load_tokenizer(ckpt / "tokenizer.json")
        engine = Engine(model, tok, max_batch=1)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            return
        if not line.strip():
            continue
        try:
            if args.endpoint:
                turn: Turn = client.complete(history + [line], [])
                history += [line, turn]
                if turn.reasoning:
                    print(f"{dim}{turn.reasoning}{reset}")
                print(turn.content)
                continue
            messages.append({"role": "user", "content": line})
            prompt = render(messages, tok, add_generation_prompt=True).ids
            rid = engine.add_request(prompt, SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature,
                                                            stop_ids=(tok.eos_id,)))
            parser, reply = StreamParser(tokenizer=tok), {"role": "assistant", "content": "", "reasoning_content": ""}
            while engine.has_work():
                for ev in engine.step():
                    if isinstance(ev, Token) and ev.token_id != tok.eos_id:
                        evs = parser.feed_ids([ev.token_id])
                    elif isinstance(ev, Finished):
                        evs = parser.finish()
                    else:
                        continue
                    for e in evs:
                        if isinstance(e, ReasoningDelta):
                            reply["reasoning_content"] += e.text
                            print(f"{dim}{e.text}{reset}", end="", flush=True)
                        elif isinstance(e, ContentDelta):
                            if not reply["content"]:
                                print()
                            reply["content"] += e.text
                            print(e.text, end="", flush=True)
                        elif isinstance(e, ToolCallEnd):
                            print(f"\n-> {e.name}({json.dumps(e.arguments, ensure_ascii=False)})", end="")
            print()
            messages.append(reply)
        except KeyboardInterrupt:
            if not args.endpoint:
                engine.cancel(rid)
                while engine.has_work():
                    engine.step()
            print("\n[cancelled]", file=sys.stderr)


def _agent(args: argparse.Namespace) -> None:
    import os

    from xinzhou.agent import loop
    from xinzhou.agent.client import make_client
    from xinzhou.agent.tools import Workspace, default_tools

    ws = Path(args.workspace)
    if not ws.is_dir():
        raise OutputError(f"{ws}: the workspace must be an existing directory")
    key = args.api_key or os.environ.get("XINZHOU_API_KEY", "none")
    client = make_client(args.protocol, args.endpoint, args.model, api_key=key, keep_thinking=not args.drop_thinking)
    tools = default_tools(Workspace(ws))
    dim, bold, reset = ("\033[2m", "\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "", "")
    history: list = []
    while True:
        task = args.task
        if task is None:
            try:
                task = input(f"{bold}you>{reset} ")
            except EOFError:
                return
            if not task.strip():
                continue
        try:
            for ev in loop.run(client, history + [task], tools, max_steps=args.max_steps):
                if isinstance(ev, loop.Thinking):
                    print(f"{dim}{ev.text}{reset}")
                elif isinstance(ev, loop.Text):
                    print(ev.text)
                elif isinstance(ev, loop.ToolCallEvent):
                    print(f"{bold}-> {ev.name}{reset}({json.dumps(ev.arguments, ensure_ascii=False)})")
                elif isinstance(ev, loop.ToolResultEvent):
                    print(f"{dim}<- {'ok' if ev.ok else 'failed'}: {ev.content[:500]}{reset}")
                elif isinstance(ev, loop.Summarized):
                    print(f"{dim}[summarised {ev.turns} earlier entries]{reset}")
                elif isinstance(ev, loop.Error):
                    print(f"xinzhou: error: {ev.message}", file=sys.stderr)
                elif isinstance(ev, loop.Final):
                    history = ev.history
        except KeyboardInterrupt:  # cancels this task; the conversation so far is kept
            print("\n[cancelled]", file=sys.stderr)
            if args.task is not None:
                raise
        if args.task is not None:
            return


def read_levels(path: Path) -> list[dict]:
    """An earlier levels.json, checked."""
    try:
        levels = json.loads(Path(path).read_text())
        ok = isinstance(levels, list) and all(isinstance(x, dict) and {"level", "score", "passed"} <= x.keys()
                                                for x in levels)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"--compare {path}: cannot read it as JSON ({e})") from None
    if not ok:
        raise DataError(f"--compare {path}: not a levels.json written by `xinzhou eval` (a list of levels with "
                        "'level', 'score' and 'passed')")
    return levels


def _eval(args: argparse.Namespace) -> None:
    import os

    sources = [x for x in (args.ckpt, args.model, args.endpoint) if x]
    if len(sources) != 1:
        raise DataError("xinzhou eval: give one checkpoint (CKPT or --model DIR) or one --endpoint URL")
    compare = Path(args.compare) if args.compare else None
    previous = read_levels(compare) if compare else None  # before the new report can overwrite it
    if args.endpoint:
        if not args.out:
            raise OutputError("xinzhou eval --endpoint: say where the report goes with --out DIR")
        results = report(None, Path(args.out), n=args.n, endpoint=args.endpoint, protocol=args.protocol,
                         served_name=args.served_name, api_key=args.api_key or os.environ.get("XINZHOU_API_KEY", "none"),
                         compare=compare, previous=previous)
    else:
        ckpt = Path(args.ckpt or args.model)
        if not ckpt.is_dir():
            raise CheckpointError(f"{ckpt}: no such checkpoint directory")
        results = report(ckpt, Path(args.out or ckpt.parent), n=args.n, compare=compare, previous=previous)
    sys.stdout.write(report_markdown(results))
    if previous is not None:
        from xinzhou.evals import compare_markdown
        sys.stdout.write(f"\nChange from {compare}:\n\n" + compare_markdown(results, previous))


def _run(args: argparse.Namespace) -> None:
    if args.cmd == "serve":
        from xinzhou.server.app import serve

        model = Path(args.model)
        if not model.is_dir():
            raise CheckpointError(f"{model}: no such checkpoint directory")
        serve(str(model), args.host, args.port, args.api_key, args.served_name or model.resolve().name,
              args.max_batch)
    elif args.cmd == "agent":
        _agent(args)
    elif args.cmd == "chat":
        _chat(args)
    elif args.cmd == "data":
        _check_inputs_not_output(args.inputs, args.out)
        for i in args.inputs:
            if not Path(i).exists():
                raise DataError(f"{i}: no such file or directory")
        tok = load_tokenizer(Path(args.tokenizer))
        items = (doc for path in args.inputs for doc in read_corpus(path, args.paragraphs))
        out = write_shards(tokenize_docs(items, tok), args.out, tok.vocab_size, source=" ".join(args.inputs))
        meta = json.loads((out / "meta.json").read_text())
        _log(f"{out}: {meta['n_docs']} documents, {meta['n_tokens']} tokens")
    elif args.cmd == "speedrun":
        recipe = RECIPES[args.preset]
        if args.no_doc_mask:
            recipe = dataclasses.replace(recipe, doc_mask=False)
        if args.optimizer:
            recipe = dataclasses.replace(recipe, optimizer=args.optimizer)
        if args.rl_steps is not None:
            recipe = dataclasses.replace(recipe, rl_steps=args.rl_steps)
        speedrun(recipe, args.out, args.seed, name=args.preset)
    elif args.cmd == "eval":
        _eval(args)


if __name__ == "__main__":
    main()
