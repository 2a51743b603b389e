"""The optimisers of the trainers: AdamW, or Muon for the hidden matrices with AdamW for the rest.

Muon (Jordan et al. 2024; used by modded-nanogpt and nanochat) takes the momentum of a weight
matrix's gradient and replaces it by the nearest semi-orthogonal matrix (all singular values
about 1, found by a few Newton-Schulz iterations), so every direction of the matrix moves at the
same rate. On the tiny speedrun shape it is what lets content-based copying (induction heads)
form within the CPU budget: experiments/induction/ measures it.

One optimiser class holds both kinds of parameter group (`"muon": True/False`), so checkpoints,
resume and FSDP's optimiser state dict see one optimiser. The trainer sets each group's lr every
step as `schedule(step) * group["lr_ratio"]`: the Muon groups run at muon_lr / lr times the AdamW
rate on the same warmup and decay. Weight decay is decoupled (p -= lr * wd * p) and its per-step
amount is the same in both kinds of group (the Muon groups' coefficient is divided by lr_ratio).
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Muon's quintic: fast rather than exact


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximation of U V^T for each matrix of g [..., m, n] (g = U S V^T): five Newton-Schulz
    iterations of Muon's quintic on g / ||g||_F, in fp32. The singular values land in about
    [0.7, 1.2] rather than exactly at 1, which trains as well and needs fewer iterations."""
    a, b, c = NS_COEFFS
    x = g.float().reshape(-1, *g.shape[-2:])  # [batch, m, n]: one code path for matrices and expert stacks
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    tall = x.size(-2) > x.size(-1)
    for _ in range(steps):
        # x <- a x + (b A + c A^2) x with A = x x^T, or x (b A + c A^2) with A = x^T x for a tall x:
        # the same iteration on the smaller Gram matrix, with no transposed copy of x
        gram = x.mT @ x if tall else x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, x, poly, beta=a) if tall else torch.baddbmm(x, poly, x, beta=a)
    return x.reshape(g.shape).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups with muon=True (momentum, Nesterov, then each matrix of the update
    orthogonalised, one per expert for [E, m, n] expert weights, scaled by sqrt(max(1, m / n))),
    AdamW for the others (the same update as torch.optim.AdamW). FSDP2-sharded parameters
    (DTensors) are orthogonalised whole: the update is gathered, orthogonalised on every rank and
    each rank keeps its shard."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.95):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      muon=False, lr_ratio=1.0))
        for group in self.param_groups:
            if group["muon"] and any(p.dim() < 2 for p in group["params"]):
                raise ValueError("Muon parameter groups take matrices (or stacks of them) only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if not group["muon"]:
                self._adamw(params, [self.state[p] for p in params], group)
                continue
            lr, wd = group["lr"], group["weight_decay"]
            for p in params:
                if wd:
                    p.mul_(1 - lr * wd)
                self._muon(p, p.grad, self.state[p], lr, group["momentum"])
        return loss

    @staticmethod
    def _muon(p: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, momentum: float) -> None:
        if not state:
            state["momentum"] = torch.zeros_like(p)
        buf = state["momentum"]
        buf.mul_(momentum).add_(grad)
        update = grad.add(buf, alpha=momentum)  # Nesterov
        if hasattr(update, "full_tensor"):  # an FSDP2 shard: orthogonalise the whole matrix, keep this rank's part
            from torch.distributed.tensor import distribute_tensor
            update = distribute_tensor(orthogonalize(update.full_tensor()), update.device_mesh, update.placements)
        else:
            update = orthogonalize(update)
        p.add_(update, alpha=-lr * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)

    @staticmethod
    def _adamw(params: list[torch.Tensor], states: list[dict], group: dict) -> None:
        """torch's AdamW update (decoupled decay, then the bias-corrected step), by its fused kernel:
        one pass per tensor, as make_optimizer's "adamw" takes. The kernel reads each step count on
        its parameter's device (a checkpoint may hold them on the CPU)."""
        for p, state in zip(params, states):
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            elif state["step"].device != p.device:
                state["step"] = state["step"].to(p.device)
        b1, b2 = group["betas"]
        adam(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
             [s["step"] for s in states], fused=True, decoupled_weight_decay=True, amsgrad=False, beta1=b1, beta2=b2,
             lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """The hidden matrices: attention projections and expert weights. Not the embedding, the LM
    head or the MoE router (their rows are per token or per expert, not a linear map to balance),
    and not lightning attention's sigmoid output gate: on Muon it cost the speedrun its copying of
    listed values in two seeds of three (seed 0: 157 of 199 held-out key lookups answered no value
    of the list, against 17 of 199 with the gate on AdamW; docs/levels-log.md)."""
    return (p.dim() >= 2 and not name.startswith(("embed", "lm_head"))
            and not name.endswith(("moe.gate.weight", "attn.output_gate.weight")))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float = 1e-8, kind: str = "adamw", muon_lr: float = 0.02) -> torch.optim.Optimizer:
    """kind "adamw": torch's AdamW (fused: one pass per tensor, 4.5x faster than the per-tensor loop
    for 60M parameters on a CPU) with weight decay on matrices only (not embeddings, norms or
    biases). kind "muon": MuonAdamW with the hidden matrices (is_muon_param) on Muon at muon_lr
    (group lr_ratio = muon_lr / lr) and everything else on AdamW at lr; decay as with "adamw"."""
    if kind not in ("adamw", "muon"):
        raise ValueError(f"optimizer {kind!r}: expected 'adamw' or 'muon'")
    if kind == "muon" and not muon_lr > 0:
        raise ValueError(f"muon_lr = {muon_lr}: must be > 0")
    muon, decay, other = [], [], []
    for n, p in model.named_parameters():
        if kind == "muon" and is_muon_param(n, p):
            muon.append(p)
        elif p.dim() >= 2 and not n.startswith("embed"):
            decay.append(p)
        else:
            other.append(p)
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=other, weight_decay=0.0)]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    ratio = muon_lr / lr
    groups.insert(0, dict(params=muon, muon=True, lr_ratio=ratio, lr=muon_lr, weight_decay=weight_decay / ratio))
    return MuonAdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)
