"""Pretraining and SFT: one loop, one process or many (torchrun + FSDP2), resumable.

    python -m xinzhou.train --data runs/x/data/sft --out runs/x/sft --init-from runs/x/pretrain/ckpt
    torchrun --nproc_per_node 2 -m xinzhou.train --data ... --out ...

SFT is pretraining with a loss mask (the shards carry it). Windows are packed with whole documents;
with doc_mask (the default) each document is computed as if alone: positions from 0, attention
and the lightning state inside the document, as at inference. AdamW (or Muon for the hidden
matrices: --optimizer muon, xinzhou/optim.py), linear warmup + cosine decay,
gradient clipping, gradient accumulation, bf16 autocast on GPU. The loss of a step is the mean
cross-entropy over every target token of the global batch (all micro-batches, all ranks), so
1 x 8 and 8 x 1 accumulation and 1 or 2 ranks give the same updates.

Output directory:
    run.json        full config, git commit, library versions
    metrics.jsonl   one row per step (loss, ce, aux, lr, grad_norm, tokens/s)
    loss.png        the loss curve, drawn from metrics.jsonl
    ckpt/           Hugging Face checkpoint (config.json, safetensors, tokenizer.json) + trainer_state.pt,
                    written by xinzhou.atomic: a temporary directory renamed into place, so a half-written
                    one is never loaded and a complete one is always on disk (a run killed between the
                    renames finds its last checkpoint again; stale temporaries are removed at the start)

An existing output directory is used (and resumed) only when it is a training directory xinzhou
wrote; `python -m xinzhou.train` prints errors as `xinzhou: error: ...` (`--debug` for tracebacks).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from xinzhou.atomic import atomic_dir, recover
from xinzhou.config import ModelConfig, preset
from xinzhou.data import PackedLoader
from xinzhou.errors import CheckpointError, DataError, OutputError, cli_errors
from xinzhou.hf import config_from_hf, config_to_hf, load_hf, write_hf
from xinzhou.model import XinzhouLM
from xinzhou.optim import make_optimizer
from xinzhou.ops.moe import update_correction_bias


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    data: str  # shard directory (data.write_shards)
    out_dir: str
    seq_len: int = 256
    batch_size: int = 16  # sequences per rank per micro-step
    grad_accum: int = 1
    steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    optimizer: str = "adamw"  # or "muon": Muon for the hidden matrices at muon_lr, AdamW at lr for the rest
    muon_lr: float = 0.02  # peak lr of the Muon groups (same warmup and decay as lr)
    grad_clip: float = 1.0
    doc_mask: bool = True  # each document of a packed window on its own (as at inference), not seeing the one before
    bias_update_rate: float = 0.001  # sigmoid routers (M2): correction-bias step per optimizer step
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end
    init_from: str | None = None  # a checkpoint directory to start from (SFT after pretraining)
    tokenizer: str | None = None  # tokenizer.json copied into every checkpoint
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 1")
        for name in ("warmup_steps", "ckpt_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 0")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr = {self.lr}, min_lr_ratio = {self.min_lr_ratio}: need lr > 0 and "
                             "min_lr_ratio in [0, 1]")
        if self.optimizer not in ("adamw", "muon") or not self.muon_lr > 0:
            raise ValueError(f"optimizer = {self.optimizer!r}, muon_lr = {self.muon_lr}: expected 'adamw' or "
                             "'muon' and muon_lr > 0")


# ----------------------------------------------------------------------------- pieces every trainer shares
# (pretraining and SFT here; RL in rl_train.py): schedule, model building and sharding, optimiser,
# checkpoint save and resume, metrics.

def cosine_lr(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps to `peak`, then cosine decay to min_ratio * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def lr_at(step: int, cfg: TrainConfig) -> float:
    return cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)


def run_info(model_cfg: ModelConfig, cfg: object) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    import safetensors
    import tokenizers
    return dict(model=model_cfg.to_dict(), train=dataclasses.asdict(cfg), git_commit=commit or None,
                versions=dict(python=platform.python_version(), torch=torch.__version__,
                              numpy=np.__version__, safetensors=safetensors.__version__,
                              tokenizers=tokenizers.__version__),
                world_size=dist.get_world_size() if dist.is_initialized() else 1)


def check_compatible(ckpt_cfg: ModelConfig, model_cfg: ModelConfig, where: Path) -> None:
    """The requested model must be the checkpoint's, as far as a checkpoint can say: compare both
    through the checkpoint's config.json (runtime choices such as lm_head_fp32 are not stored)."""
    requested = config_from_hf(config_to_hf(model_cfg))
    diff = {f.name: (getattr(ckpt_cfg, f.name), getattr(requested, f.name)) for f in dataclasses.fields(ModelConfig)
            if getattr(ckpt_cfg, f.name) != getattr(requested, f.name) and f.name != "lm_head_fp32"}
    if diff:
        raise CheckpointError(f"{where}: incompatible checkpoint: " + ", ".join(
            f"{k} is {a!r} there, {b!r} here" for k, (a, b) in diff.items()))


# ----------------------------------------------------------------------------- checkpoints

def _full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)
    return model.state_dict(), opt.state_dict()


def save_checkpoint(model: torch.nn.Module, opt: torch.optim.Optimizer, out_dir: Path, model_cfg: ModelConfig,
                    step: int, state: dict, config: object, tokenizer: str | None = None) -> None:
    """out_dir/ckpt, atomically: the Hugging Face checkpoint, trainer_state.pt (step, optimiser,
    RNG states and the trainer's own `state`, e.g. its data position) and the trainer's config."""
    model_sd, opt_sd = _full_state(model, opt)
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return
    with atomic_dir(Path(out_dir) / "ckpt", "checkpoint") as tmp:
        write_hf(model_sd, model_cfg, tmp)
        torch.save(dict(step=step, optimizer=opt_sd, distributed=dist.is_initialized(),
                        rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate()),
                        **state), tmp / "trainer_state.pt")
        (tmp / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        if tokenizer:
            shutil.copy(Path(tokenizer), tmp / "tokenizer.json")
    if dist.is_initialized():
        dist.barrier()


def load_trainer_state(ckpt: Path, world: int, keys: tuple[str, ...] = ()) -> dict:
    """trainer_state.pt of a checkpoint, checked: readable, with the keys resuming needs, saved with
    the same world size (the optimiser state of 1 rank and of N ranks differ in layout)."""
    try:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        for key in ("step", "optimizer", "rng", "distributed", *keys):
            state[key]  # noqa: B018 - what resuming reads
    except Exception as e:  # a damaged or foreign file: torch raises many types
        raise CheckpointError(f"{ckpt / 'trainer_state.pt'}: unreadable trainer state ({type(e).__name__}: {e}); "
                              f"remove {ckpt} to start over") from e
    if state["distributed"] != (world > 1):
        raise CheckpointError(f"{ckpt}: optimizer state was saved with world_size "
                              f"{'>1' if state['distributed'] else '1'}; resume with the same")
    return state


def restore(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict, world: int) -> int:
    """Optimiser and RNG states back from load_trainer_state; returns the step to continue from."""
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return int(state["step"])


def build_model(model_cfg: ModelConfig | None, source: Path | None, device: torch.device,
                world: int, **runtime: object) -> XinzhouLM:
    """A fresh model of model_cfg, or the checkpoint at source (checked against model_cfg when both
    are given; runtime choices such as lm_head_fp32 come from model_cfg, or from `runtime` when
    there is none); FSDP2-sharded per block when world > 1."""
    if source is not None:
        if model_cfg is not None:
            runtime = {"lm_head_fp32": model_cfg.lm_head_fp32}
        model = load_hf(source, device=device, **runtime)
        if model_cfg is not None:
            check_compatible(model.config, model_cfg, source)
    elif model_cfg is not None:
        model = XinzhouLM(model_cfg).to(device)
    else:
        raise ValueError("a trainer needs a model config or a checkpoint to start from")
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def start_metrics(path: Path, start: int) -> None:
    """metrics.jsonl for a run (re)starting at step `start`: rows of later steps (written after the
    checkpoint it resumes from) are dropped, so every step appears once."""
    rows = [r for r in _read_metrics(path) if r["step"] < start] if start else []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def log_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def prepare_out_dir(out: Path, rank: int) -> Path:
    """Check, create and recover out/ (rank 0); returns out/ckpt."""
    ckpt = out / "ckpt"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        recover(ckpt, "checkpoint")  # an interrupted save: restore the last complete checkpoint, drop temporaries
    if dist.is_initialized():
        dist.barrier()
    return ckpt


# ----------------------------------------------------------------------------- the loop

def setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return dist.get_rank(), world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return dist.get_rank(), world, torch.device("cpu")


def keep_freed_memory(device: torch.device) -> None:
    """On a CPU with glibc, keep freed memory in the process for the next step. By default glibc maps
    each large block (a training step's activations and gradients, 1-67 MiB at the benchmark shapes)
    fresh from the OS and hands it back when freed, so every step page-faults its memory in again:
    about 7% of a tiny-model step (benchmarks/RESULTS.md). A fixed, high mmap threshold and trim
    threshold keep it on the heap; a training process's peak memory is what it uses anyway."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


RUN_FILES = ("run.json", "metrics.jsonl", "loss.png", "ckpt")  # what train() writes into out_dir


def check_run_dir(out: Path) -> None:
    """out_dir must be new, empty, or a training directory xinzhou wrote (it is resumed)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is a file; the training output must be a directory")
    if out.is_dir():
        entries = {p.name for p in out.iterdir()}
        if entries and not entries & set(RUN_FILES):
            raise OutputError(f"{out}: holds files that are not a xinzhou training run ({', '.join(sorted(entries)[:5])}); "
                              "choose a new or empty output directory")


def train(model_cfg: ModelConfig | None, cfg: TrainConfig,
          on_step: Callable[[int, XinzhouLM], None] | None = None) -> Path:
    """Train to cfg.steps (resuming from out_dir/ckpt when it is there); returns the checkpoint dir.
    on_step(steps_done, model), in one process only, is called after every optimizer step with
    the model in eval mode under no_grad (e.g. to score it); the RNG states are restored after it
    and its time is left out of tokens/s, so a run with it trains exactly as one without."""
    out = Path(cfg.out_dir)
    check_run_dir(out)
    if cfg.tokenizer and not Path(cfg.tokenizer).is_file():
        raise DataError(f"{cfg.tokenizer}: no such tokenizer file (expected a tokenizer.json)")
    if cfg.init_from and not Path(cfg.init_from).is_dir():
        raise CheckpointError(f"{cfg.init_from}: no such checkpoint directory (init_from)")
    if model_cfg is None and not cfg.init_from and not (out / "ckpt").exists():
        raise ValueError("train() needs a model config (e.g. --preset tiny) or an init_from checkpoint")
    PackedLoader(cfg.data, cfg.seq_len, cfg.batch_size, 0, 1, cfg.seed)  # bad data fails before anything is written
    rank, world, device = setup_distributed()
    keep_freed_memory(device)
    ckpt = prepare_out_dir(out, rank)
    torch.manual_seed(cfg.seed)

    resume = (ckpt / "trainer_state.pt").exists()
    source = ckpt if resume else (Path(cfg.init_from) if cfg.init_from else None)
    model = build_model(model_cfg, source, device, world)
    model_cfg = model.config
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), kind=cfg.optimizer,
                         muon_lr=cfg.muon_lr)
    loader = PackedLoader(cfg.data, cfg.seq_len, cfg.batch_size, rank, world, cfg.seed)
    if loader.meta["vocab_size"] > model_cfg.vocab_size:
        raise DataError(f"{cfg.data}: tokens up to {loader.meta['vocab_size']} but the model's vocab is "
                         f"{model_cfg.vocab_size}")
    start = 0
    if resume:
        state = load_trainer_state(ckpt, world, keys=("loader",))
        start = restore(model, opt, state, world)
        loader.load_state_dict(state["loader"])

    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        (out / "run.json").write_text(json.dumps(run_info(model_cfg, cfg), indent=2, default=str))
        start_metrics(metrics_path, start)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {out.name}", unit="step",
                   mininterval=0.5 if sys.stderr.isatty() else 15.0)
    model.train()
    t0, tokens_seen = time.time(), 0
    for step in range(start, cfg.steps):
        batches = [loader.next_packed() for _ in range(cfg.grad_accum)]
        n_local = sum(int((y != -100).sum()) for _, y, _ in batches)
        counts = torch.tensor([float(n_local)], device=device)  # NCCL reduces device tensors only
        if world > 1:
            dist.all_reduce(counts)
        n_global = max(counts.item(), 1.0)
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # Muon groups: muon_lr / lr
        ce_sum, aux_sum = 0.0, 0.0
        for x, y, seg in batches:
            x, y = x.to(device), y.to(device)
            n = int((y != -100).sum())
            with autocast:
                _, ce, aux = model(x, y, segment_ids=seg.to(device) if cfg.doc_mask else None, return_parts=True)
            # sum of token losses over the global count; FSDP averages gradients over ranks, so * world
            ce_part = ce * n / n_global * world if n else ce * 0.0
            (ce_part + model_cfg.router_aux_loss_coef * aux / cfg.grad_accum).backward()
            if n:  # a micro-batch with no target tokens has ce = nan and adds nothing
                ce_sum += ce.item() * n
            aux_sum += aux.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for block in model.layers:  # M2's aux-loss-free balancing: nudge the routing bias toward even load
            moe = block.moe
            if moe.expert_load is not None:
                if world > 1:
                    dist.all_reduce(moe.expert_load)
                with torch.no_grad():
                    update_correction_bias(moe.correction_bias, moe.expert_load, cfg.bias_update_rate)
                moe.expert_load.zero_()
        stats = torch.tensor([ce_sum, aux_sum / cfg.grad_accum], device=device)
        if world > 1:
            dist.all_reduce(stats)
        ce_mean, aux_mean = stats[0].item() / n_global, stats[1].item() / world
        tokens_seen += int(n_global)
        if rank == 0:
            row = dict(step=step, loss=ce_mean + model_cfg.router_aux_loss_coef * aux_mean, ce=ce_mean, aux=aux_mean,
                       lr=lr, grad_norm=grad_norm, tokens=int(n_global),
                       tok_per_s=tokens_seen / max(time.time() - t0, 1e-9))
            log_metrics(metrics_path, row)
            if bar is not None:
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps - 1:
                    bar.set_postfix(loss=f"{ce_mean:.4f}", lr=f"{lr:.2e}", refresh=False)
        if on_step is not None and world == 1:
            t_hook = time.time()
            rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
            model.eval()
            with torch.no_grad():
                on_step(step + 1, model)
            model.train()
            torch.set_rng_state(rng[0])
            np.random.set_state(rng[1])
            random.setstate(rng[2])
            t0 += time.time() - t_hook
        if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(model, opt, out, model_cfg, step + 1, {"loader": loader.state_dict()}, cfg, cfg.tokenizer)
    if bar is not None:
        bar.close()
    if start < cfg.steps or not resume:
        save_checkpoint(model, opt, out, model_cfg, cfg.steps, {"loader": loader.state_dict()}, cfg, cfg.tokenizer)
    if rank == 0:
        plot_metrics(metrics_path, out / "loss.png", title=out.name)
    if dist.is_initialized():
        dist.barrier()  # tear down together: a rank that destroys the group while another still plots can abort it
        dist.destroy_process_group()
    return ckpt


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything before it is good
    return rows


def plot_metrics(metrics_path: Path, png: Path, title: str = "") -> None:
    rows = _read_metrics(metrics_path)
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot([r["step"] for r in rows], [r["ce"] for r in rows])
    a.set(xlabel="step", ylabel="cross-entropy", title=f"{title} loss", yscale="log")
    b.plot([r["step"] for r in rows], [r["lr"] for r in rows])
    b.set(xlabel="step", ylabel="learning rate")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="xinzhou pretraining / SFT")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default=None, help="model preset for a fresh model (tiny, small, ...)")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--init-from", default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("data", "out_dir", "init_from", "tokenizer", "progress"):
            continue
        if isinstance(f.default, bool):  # --doc-mask / --no-doc-mask
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        cfg = TrainConfig(data=args.data, out_dir=args.out, init_from=args.init_from, tokenizer=args.tokenizer,
                          **{k: v for k, v in vars(args).items() if k in fields and k not in ("data", "init_from", "tokenizer")})
        model_cfg = None
        if args.preset:
            model_cfg = preset(args.preset, **({"vocab_size": args.vocab_size} if args.vocab_size else {}))
    except ValueError as e:
        p.error(str(e))
    if model_cfg is None and not args.init_from and not (Path(args.out) / "ckpt").exists():
        p.error("a fresh run needs --preset (e.g. --preset tiny) or --init-from CKPT")
    with cli_errors(args.debug):
        train(model_cfg, cfg)


if __name__ == "__main__":
    main()
