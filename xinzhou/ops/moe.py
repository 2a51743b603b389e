"""Mixture-of-Experts: routing and SwiGLU experts, as a reference loop and as a grouped-GEMM path.

Legend: N tokens, C hidden, E experts, K experts per token, F expert width.
    x: [N, C]; w13: [E, 2F, C] (w1 rows, then w3 rows); w2: [E, C, F]
    expert e computes w2_e(silu(w1_e x) * w3_e x)

Routers (both return fp32 weights [N, K] and indices [N, K]):
- "softmax" (MiniMax-01/M1): softmax over E in fp32, top-K, renormalised to sum 1.
- "sigmoid" (MiniMax-M2): sigmoid scores; the top-K is chosen on score + correction_bias (the bias
  only steers the choice); weights are the chosen sigmoid scores, renormalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xinzhou.ops import pick_triton


def route(logits: torch.Tensor, k: int, kind: str,
          correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, E] -> (weights [N, K] fp32, indices [N, K], probs [N, E] fp32 for the balance loss)."""
    logits = logits.float()
    if kind == "softmax":
        probs = torch.softmax(logits, dim=-1)
        weights, indices = torch.topk(probs, k, dim=-1)
    elif kind == "sigmoid":
        scores = torch.sigmoid(logits)
        choice = scores if correction_bias is None else scores + correction_bias.float()
        indices = torch.topk(choice, k, dim=-1).indices
        weights = scores.gather(-1, indices)
        probs = scores / scores.sum(dim=-1, keepdim=True)
    else:
        raise ValueError(f"router kind {kind!r}: expected 'softmax' or 'sigmoid'")
    return weights / weights.sum(dim=-1, keepdim=True), indices, probs


def balance_stats(probs: torch.Tensor, indices: torch.Tensor, num_experts: int,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-expert sums for the load-balancing loss: [2, E] = (routing slots sent to e, sum of P_e),
    and the token count in a third row. Summing these over layers and dividing gives f_e and P_e
    over all tokens of all layers. mask [N] (1 = real token) drops padding."""
    m = torch.ones(probs.shape[0], device=probs.device) if mask is None else mask.float().reshape(-1)
    counts = torch.zeros(num_experts, device=probs.device).index_add_(
        0, indices.reshape(-1), m.repeat_interleave(indices.shape[1]))
    prob_sum = (probs * m[:, None]).sum(0)
    tokens = torch.full((num_experts,), 0.0, device=probs.device) + m.sum()
    return torch.stack([counts, prob_sum, tokens])


def balance_loss(stats: torch.Tensor) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss from summed `balance_stats`: E * sum_e f_e * P_e, with
    f_e = routing slots sent to e per token (the K slots of a token count, so f sums to K) and P_e
    the mean router probability of e: K when perfectly balanced. This is the formula of MiniMax's
    modelling code and transformers' `load_balancing_loss_func`, so `router_aux_loss_coef` means
    the same in both."""
    counts, prob_sum, tokens = stats
    n = tokens[0].clamp(min=1.0)
    return counts.numel() * ((counts / n) * (prob_sum / n)).sum()


def swiglu(gate_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """[M, 2F] (gate columns, then up columns) -> silu(gate) * up [M, F]. backend "auto": one fused
    Triton pass each way for CUDA tensors (see ops/__init__.py), else PyTorch; "triton"; "reference"."""
    module = pick_triton(gate_up, backend, "swiglu_triton")
    if module is not None:
        return module.swiglu_triton(gate_up)
    if not torch.compiler.is_compiling():  # under compile, the compiler fuses the plain formula
        return _SwiGLU.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    """Eager SwiGLU whose backward writes d(gate) and d(up) straight into one [M, 2F] gradient
    (autograd's chunk would concatenate them: one more pass over the largest tensor of the MoE)."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - torch's signature
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        dgu = torch.empty_like(gate_up)
        d_gate, d_up = dgu.chunk(2, dim=-1)
        torch.ops.aten.silu_backward(dy * up, gate, grad_input=d_gate)
        torch.mul(dy, act, out=d_up)
        return dgu


class _GatherSlots(torch.autograd.Function):
    """x [N, C] -> the rows of the N*K routing slots in expert order, x[order // K]. Its backward is
    a permutation and a sum over each token's K slots (autograd's would accumulate an index_put)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(order)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, dxs: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        (order,) = ctx.saved_tensors
        unsorted = torch.empty_like(dxs).index_copy_(0, order, dxs)
        return unsorted.view(-1, ctx.k, dxs.shape[-1]).sum(1), None, None


def _swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ w13.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.t()


def experts_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                 indices: torch.Tensor) -> torch.Tensor:
    """Reference: for each expert, gather its tokens, run the SwiGLU, scatter-add weighted outputs."""
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        token, slot = torch.where(indices == e)
        if token.numel() == 0:
            continue
        y = _swiglu(x[token], w13[e], w2[e]) * weights[token, slot, None].to(x.dtype)
        out = out.index_add(0, token, y)
    return out


def _grouped_mm_ok(*tensors: torch.Tensor) -> bool:
    # torch's grouped_mm wants 16-byte aligned strides; fall back to a segment loop otherwise
    if not hasattr(F, "grouped_mm"):
        return False
    if tensors[0].is_cuda and any(t.dtype != torch.bfloat16 for t in tensors):
        return False  # the CUDA kernels take bf16 only
    return all(1 in t.stride() and all(s == 1 or s * t.element_size() % 16 == 0 for s in t.stride())
               for t in tensors)


def _segment_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, a] rows grouped by expert (group e ends at offsets[e]) times w [E, a, b] -> [M, b]."""
    if _grouped_mm_ok(x, w) and x.is_contiguous():
        return F.grouped_mm(x, w, offs=offsets)
    bounds = [0] + offsets.tolist()
    return torch.cat([x[a:b] @ w[e] for e, (a, b) in enumerate(zip(bounds, bounds[1:]))])


def experts_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                    indices: torch.Tensor) -> torch.Tensor:
    """Grouped path: sort the N*K routing slots by expert, two grouped GEMMs, unsort, weighted sum over K."""
    N, K = indices.shape
    if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not on autocast's lists: cast here
        dt = torch.get_autocast_dtype(x.device.type)
        x, w13, w2 = x.to(dt), w13.to(dt), w2.to(dt)
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slots sorted by expert
    counts = torch.zeros(w13.shape[0], dtype=torch.int32, device=x.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))  # no host sync, unlike bincount
    offsets = counts.cumsum(0).to(torch.int32)
    xs = _GatherSlots.apply(x, order, K)  # [N*K, C]
    h = swiglu(_segment_mm(xs, w13.transpose(1, 2), offsets))  # [N*K, 2F] -> [N*K, F]
    y = _segment_mm(h, w2.transpose(1, 2), offsets)  # [N*K, C]
    y = y * weights.reshape(-1)[order, None].to(x.dtype)
    # back to slot order (a permutation: a plain scatter, no atomics), then each token sums its K
    # outputs; unlike index_add, deterministic on the GPU and rounded once in bf16
    return torch.empty_like(y).index_copy(0, order, y).view(N, K, -1).sum(1)


def update_correction_bias(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing (MiniMax-M2, as DeepSeek-V3): after a step, raise the routing bias of
    experts that got fewer than the mean number of slots and lower it for those that got more.
    In place; bias and load are [E]."""
    bias += rate * torch.sign(load.mean() - load)
