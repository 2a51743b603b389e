"""RL on verifiable rewards: rollouts through the engine, rewards from the task verifiers, CISPO /
DAPO / GRPO updates (xinzhou.rl), resumable like pretraining.

    xinzhou rl --model runs/speedrun/sft/ckpt --task countdown --loss cispo --out runs/rl
    python -m xinzhou.rl_train --model CKPT --task countdown --loss dapo --steps 30 --out DIR

One step: `prompts_per_step` training problems of the task family, `group_size` rollouts each at
temperature 1 (the engine reports each token's log-probability under the policy that sampled it),
a reward of 1 when the verifier accepts the final answer, group-normalised advantages, groups
whose rewards all agree dropped (dynamic sampling), then `updates_per_step` minibatch updates
whose ratio is taken against the rollout's own log-probabilities, so that after the first
update the clip acts. A rollout stops early once its last `repetition_stop` tokens repeat one block
of at most half as many tokens (`looping`: a degenerate loop; reward 0, masked out of the loss like
a truncated one). A run of confident tokens is not a loop: a learned L3 search wrote up to 38 tokens
in a row above probability 0.99 on held-out problems.

The LM head runs in fp32 in both rollout and update when `lm_head_fp32` (MiniMax-M1's fix for the
train/inference mismatch); the correlation of rollout and training log-probabilities of the same
tokens is logged every step. On the CPU every matmul is fp32 anyway, so the option matters on GPUs.

Output directory (as train.py's): run.json, metrics.jsonl (one row per step: reward, pass rate on
held-out problems every `eval_every` steps, entropy, clip fraction, response length, repetition
rate, KL between consecutive policies, rollout/training log-prob correlation), rl.png, ckpt/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from xinzhou import rl, tasks
from xinzhou.chat_format import parse_ids, render
from xinzhou.engine import Engine, Finished, SamplingParams, Token
from xinzhou.engine.logprobs import logprobs_of
from xinzhou.errors import CheckpointError, DataError, cli_errors
from xinzhou.evals import EVAL_MAX_TOKENS, evaluate_level, local_client, outcome_string
from xinzhou.optim import make_optimizer
from xinzhou.tokenizer import Tokenizer
from xinzhou.train import (build_model, check_run_dir, cosine_lr, keep_freed_memory, load_trainer_state,
                           log_metrics, prepare_out_dir, restore, run_info, save_checkpoint, setup_distributed,
                           start_metrics, _read_metrics)

LOSSES = ("cispo", "dapo", "grpo")


def looping(ids: list[int], window: int) -> bool:
    """Whether the last `window` tokens repeat a block of p <= window // 2 tokens: the last
    window + p tokens have period p (so the block occurs at least three times)."""
    for p in range(1, min(window // 2, len(ids) - window) + 1):
        if ids[-1] == ids[-1 - p] and ids[-window:] == ids[-window - p:-p]:  # (one compare before a slice)
            return True
    return False


@dataclass(frozen=True, kw_only=True)
class RLConfig:
    model: str  # checkpoint directory with tokenizer.json (e.g. the speedrun's sft/ckpt)
    out_dir: str
    task: str = "countdown"  # a task family of xinzhou.tasks
    loss: str = "cispo"
    steps: int = 20  # rollout batches
    prompts_per_step: int = 16
    group_size: int = 8
    updates_per_step: int = 4  # minibatch updates per rollout batch (M1 used 16)
    lr: float = 1e-5  # from the speedrun checkpoint, 1e-5 beat 2e-5; 2e-4 made every checkpoint worse (experiments/cispo)
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0  # 1.0: constant after warmup
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8  # M1 used 1e-15: its gradients were too small for 1e-8
    grad_clip: float = 1.0
    eps_low: float | None = None  # clip offsets (see xinzhou.rl); None: the loss's own default
    eps_high: float | None = None
    temperature: float = 1.0
    max_new_tokens: int = EVAL_MAX_TOKENS  # as the levels are scored: room for L3's whole search
    repetition_stop: int = 48  # a rollout whose last 48 tokens repeat a block of <= 24 tokens ends (looping)
    dynamic_sampling: bool = True
    lm_head_fp32: bool = True
    eval_every: int = 5  # held-out pass rate every eval_every steps and after the last; 0: only before the first
    eval_n: int = 100
    seed: int = 0
    ckpt_every: int = 0  # 0: only at the end
    progress: bool = True

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss = {self.loss!r}: expected one of {LOSSES}")
        if self.task not in tasks.FAMILIES:
            raise ValueError(f"task = {self.task!r}: expected one of {list(tasks.FAMILIES)}")
        for name in ("steps", "prompts_per_step", "updates_per_step", "max_new_tokens", "eval_n", "repetition_stop"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 1")
        if self.eval_every < 0:
            raise ValueError(f"eval_every = {self.eval_every}: must be >= 0 (0: only before the first step)")
        if self.group_size < 2:
            raise ValueError(f"group_size = {self.group_size}: a group needs at least 2 rollouts to compare")
        if not self.temperature > 0:
            raise ValueError(f"temperature = {self.temperature}: RL samples, so it must be > 0")
        if not self.lr > 0:
            raise ValueError(f"lr = {self.lr}: must be > 0")


@dataclass
class Rollout:
    prompt: list[int]
    output: list[int]  # generated ids, stop id included
    old_logp: list[float]  # under the policy that sampled them
    reward: float
    finish: str  # "stop", "length" or "repetition"
    group: int


def _held_out(model: torch.nn.Module, tok: Tokenizer, level: int, n: int) -> dict:
    """The level's held-out score now, and the outcome of each problem (a string of 1 and 0, the
    form levels.json keeps, so that a report can pair them): a fresh client, the weights have
    changed since the last one."""
    with local_client(model, tok) as client:
        r = evaluate_level(client, level, n=n)
    return dict(pass_rate=r.score, outcomes=outcome_string(r.outcomes))


def _level_of(family: str) -> int:
    return next(lv.level for lv in tasks.LEVELS.values() if lv.family == family)


def rollouts(model: torch.nn.Module, tok: Tokenizer, samples: list[tasks.Sample], cfg: RLConfig,
             step: int) -> list[Rollout]:
    """group_size samples of every problem through one engine; rewards from the task's verifier."""
    engine = Engine(model, tok, max_batch=min(len(samples) * cfg.group_size, 256), prefix_reuse=False,
                    max_tokens_per_step=4096)
    owner: dict[int, tuple[int, list[int]]] = {}
    for g, s in enumerate(samples):
        prompt = render(s.messages, tok, tools=s.tools, add_generation_prompt=True).ids
        for j in range(cfg.group_size):
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                    stop_ids=(tok.eos_id,), seed=(cfg.seed * 1_000_003 + step) * 4099 + g * 61 + j)
            owner[engine.add_request(prompt, params)] = (g, prompt)
    out: dict[int, list[int]] = {rid: [] for rid in owner}
    lps: dict[int, list[float]] = {rid: [] for rid in owner}
    finish: dict[int, str] = {}
    while engine.has_work():
        for ev in engine.step():
            rid = ev.request_id
            if isinstance(ev, Token):
                out[rid].append(ev.token_id)
                lps[rid].append(ev.logprob)
                if rid not in finish and looping(out[rid], cfg.repetition_stop):
                    finish[rid] = "repetition"
                    engine.cancel(rid)
            elif isinstance(ev, Finished):
                finish.setdefault(rid, ev.reason)
    result = []
    for rid, (g, prompt) in owner.items():
        ids = out[rid]
        reason = finish[rid]
        reward = 0.0
        if reason == "stop":
            parsed = parse_ids(ids[:-1] if ids and ids[-1] == tok.eos_id else ids, tok, tools=samples[g].tools)
            reward = float(tasks.verify(samples[g], parsed))
        result.append(Rollout(prompt, ids, lps[rid], reward, reason, g))
    return result


def _batch(rs: list[Rollout], device: torch.device, mask_unfinished: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [N, L] inputs; [N, L - 1] old log-probs and a mask over the response tokens
    (position t predicts token t + 1), unfinished rollouts masked out when asked."""
    L = max(len(r.prompt) + len(r.output) for r in rs)
    ids = torch.zeros(len(rs), L, dtype=torch.long)
    old = torch.zeros(len(rs), L - 1)
    mask = torch.zeros(len(rs), L - 1)
    for i, r in enumerate(rs):
        p, n = len(r.prompt), len(r.output)
        ids[i, :p + n] = torch.tensor(r.prompt + r.output)
        old[i, p - 1:p - 1 + n] = torch.tensor(r.old_logp)
        if r.finish == "stop" or not mask_unfinished:
            mask[i, p - 1:p - 1 + n] = 1.0
    return ids.to(device), old.to(device), mask.to(device), torch.tensor([r.group for r in rs], device=device)


def _policy(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p of every next token [N, L - 1] (the engine's definition: raw fp32 log-softmax) and
    the policy's entropy at each position [N, L - 1]."""
    logits = model(ids)[:, :-1].float()  # [N, L - 1, V]
    logp_all = torch.log_softmax(logits, -1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs_of(logits, ids[:, 1:]), entropy.detach()


def _loss(cfg: RLConfig, logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor,
          mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    clip = {k: v for k, v in (("eps_low", cfg.eps_low), ("eps_high", cfg.eps_high)) if v is not None}
    if cfg.loss == "cispo":
        return rl.cispo_loss(logp, old, adv, mask, **clip)
    if cfg.loss == "dapo":
        return rl.dapo_loss(logp, old, adv, mask, **clip)
    return rl.grpo_loss(logp, old, adv, mask, **({"eps": cfg.eps_high} if cfg.eps_high is not None else {}))


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-12))


def rl_train(cfg: RLConfig) -> Path:
    """Run cfg.steps RL steps (resuming from out_dir/ckpt when it is there); returns the checkpoint."""
    out = Path(cfg.out_dir)
    check_run_dir(out)
    src = Path(cfg.model)
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such checkpoint directory")
    tok_file = src / "tokenizer.json"
    if not tok_file.is_file():
        raise DataError(f"{tok_file}: no tokenizer.json there (RL needs the checkpoint's tokenizer)")
    rank, world, device = setup_distributed()
    keep_freed_memory(device)
    if world > 1:
        raise ValueError("rl_train runs on one process (its rollouts are not sharded); run it without torchrun")
    ckpt = prepare_out_dir(out, rank)
    torch.manual_seed(cfg.seed)
    tok = Tokenizer.load(tok_file)
    resume = (ckpt / "trainer_state.pt").exists()
    model = build_model(None, ckpt if resume else src, device, world, lm_head_fp32=cfg.lm_head_fp32)
    if tok.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{tok_file}: {tok.vocab_size} tokens, the model only {model.config.vocab_size}")
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    start = restore(model, opt, load_trainer_state(ckpt, world), world) if resume else 0
    metrics = out / "metrics.jsonl"
    (out / "run.json").write_text(json.dumps(run_info(model.config, cfg), indent=2, default=str))
    start_metrics(metrics, start)
    level = _level_of(cfg.task)
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"rl {cfg.loss} {cfg.task}", unit="step",
                   mininterval=0.5 if sys.stderr.isatty() else 15.0)
    if start == 0:  # the held-out pass rate before any update: the curve's first point
        log_metrics(metrics, dict(step=-1, **_held_out(model, tok, level, cfg.eval_n)))
    t0 = time.time()
    for step in range(start, cfg.steps):
        lr = cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        samples = tasks.generate(cfg.task, "train", cfg.prompts_per_step, cfg.seed * 100_003 + step)
        rs = rollouts(model, tok, samples, cfg, step)
        rewards = torch.tensor([r.reward for r in rs])
        adv, info = rl.group_advantages(rewards, cfg.group_size)
        keep_group = ~info["zero_variance"] if cfg.dynamic_sampling else torch.ones_like(info["zero_variance"])
        kept = [i for i, r in enumerate(rs) if keep_group[r.group]]
        row = dict(step=step, lr=lr, reward=float(rewards.mean()), groups_kept=int(keep_group.sum()),
                   response_len=sum(len(r.output) for r in rs) / len(rs),
                   repetition_rate=sum(r.finish == "repetition" for r in rs) / len(rs),
                   truncated_rate=sum(r.finish == "length" for r in rs) / len(rs))
        stats_rows = []
        if kept:
            model.train()
            ids, old, mask, _ = _batch([rs[i] for i in kept], device, mask_unfinished=True)
            a = adv[kept].to(device)
            with torch.no_grad():  # the training forward before any update: its log-probs vs the rollout's
                start_logp, entropy = _policy(model, ids)
            on = mask > 0
            row["logp_corr"] = _corr(start_logp[on], old[on])
            row["entropy"] = float(entropy[on].mean()) if on.any() else float("nan")
            order = torch.randperm(len(kept))
            for chunk in order.chunk(cfg.updates_per_step):
                logp, _ = _policy(model, ids[chunk])
                loss, stats = _loss(cfg, logp, old[chunk], a[chunk], mask[chunk])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                opt.step()
                stats_rows.append(stats)
            with torch.no_grad():  # KL(pi_before || pi_after) on the step's tokens (k3 estimator)
                end_logp, _ = _policy(model, ids)
                d = (end_logp - start_logp)[on]
                row["kl"] = float((d.exp() - 1 - d).mean()) if on.any() else 0.0
            for key in ("clip_fraction", "grad_norm"):
                row[key] = sum(s[key] for s in stats_rows) / len(stats_rows)
            row["masked_fraction"] = sum(s.get("masked_fraction", 0.0) for s in stats_rows) / len(stats_rows)
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1):
            row.update(_held_out(model, tok, level, cfg.eval_n))
        row["elapsed_s"] = time.time() - t0
        log_metrics(metrics, row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward']:.2f}", **({"pass": f"{row['pass_rate']:.2f}"}
                                                              if "pass_rate" in row else {}), refresh=False)
        if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(model, opt, out, model.config, step + 1, {}, cfg, str(tok_file))
    if bar is not None:
        bar.close()
    if start < cfg.steps or not resume:
        save_checkpoint(model, opt, out, model.config, cfg.steps, {}, cfg, str(tok_file))
    plot_rl(metrics, out / "rl.png", title=f"{cfg.loss} on {cfg.task}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return ckpt


def plot_rl(metrics: Path, png: Path, title: str = "") -> None:
    rows = _read_metrics(metrics)
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    steps = [r for r in rows if "reward" in r]
    evals = [r for r in rows if "pass_rate" in r]
    axes[0].plot([r["step"] for r in steps], [r["reward"] for r in steps], label="rollout reward")
    axes[0].plot([r["step"] + 1 for r in evals], [r["pass_rate"] for r in evals], "o-", label="held-out pass rate")
    axes[0].set(xlabel="step", title=title, ylim=(0, 1))
    axes[0].legend()
    for key, ax in (("entropy", axes[1]), ("clip_fraction", axes[2])):
        pts = [r for r in steps if key in r]
        ax.plot([r["step"] for r in pts], [r[key] for r in pts])
        ax.set(xlabel="step", ylabel=key.replace("_", " "))
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory with tokenizer.json")
    p.add_argument("--out", required=True, help="run directory: metrics.jsonl, rl.png, ckpt/ (a run there resumes)")
    for f in dataclasses.fields(RLConfig):
        if f.name in ("model", "out_dir", "progress"):
            continue
        flag, shown = "--" + f.name.replace("_", "-"), "default: %(default)s"
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=shown)
        elif f.type == "float | None":
            p.add_argument(flag, type=float, default=f.default, help="default: the loss's own (see xinzhou.rl)")
        elif f.name == "loss":
            p.add_argument(flag, choices=LOSSES, default=f.default, help=shown)
        elif f.name == "task":
            p.add_argument(flag, choices=list(tasks.FAMILIES), default=f.default, help=shown)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=shown)


def config_from_args(args: argparse.Namespace) -> RLConfig:
    names = {f.name for f in dataclasses.fields(RLConfig)} - {"model", "out_dir", "progress"}
    return RLConfig(model=args.model, out_dir=args.out, **{k: getattr(args, k) for k in names})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="xinzhou RL (CISPO, DAPO, GRPO) on a task family")
    add_arguments(p)
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        p.error(str(e))
    with cli_errors(args.debug):
        rl_train(cfg)


if __name__ == "__main__":
    main()
