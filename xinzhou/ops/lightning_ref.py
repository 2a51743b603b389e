"""Lightning attention, the definition, in three forms that must agree (pure PyTorch).

MiniMax's lightning attention is linear attention with a per-head exponential decay:

    S_t = lambda * S_{t-1} + k_t^T v_t        (S: [D, D] per head, fp32)
    o_t = q_t S_t                             (no 1/sqrt(D) scale, no normaliser)

with lambda_h = exp(-slope_h). Shapes (legend):
    B batch, T tokens, H heads, D head dim, N sequences (states)
    q, k, v: [B, T, H, D]; slopes: [H]; state: [B, H, D, D] fp32

- `lightning_naive`: quadratic, o = ((q k^T) * decay mask) v, plus the initial state's contribution.
- `lightning_blockwise`: MiniMax's block form; any block size gives the same result.
- `lightning_segmented`: the block form over rows that hold several documents (packed training):
  segment_ids [B, T] mark them, and no token sees another document (the state restarts at each).
- `lightning_recurrent`: one step per token (`lightning_step`), as in decoding.

All compute in fp32 and return outputs in the input dtype and states in fp32.
"""

from __future__ import annotations

import torch


def _decay_powers(slopes: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """lambda^e = exp(-slope * e) for every head and exponent: [H, len(e)]."""
    return torch.exp(-slopes.float()[:, None] * exponents.float()[None, :])


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
           state: torch.Tensor | None) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"q, k, v must be [B, T, H, D] with equal B, T, H: got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, _, H, D = q.shape
    if slopes.shape != (H,):
        raise ValueError(f"slopes must be [H] = [{H}]: got {tuple(slopes.shape)}")
    if state is not None and state.shape != (B, H, D, v.shape[-1]):
        raise ValueError(f"state must be [B, H, D, Dv] = {[B, H, D, v.shape[-1]]}: got {list(state.shape)}")


def lightning_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                    initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadratic form: o_t = sum_{s<=t} lambda^(t-s) (q_t . k_s) v_s + lambda^(t+1) q_t S_0."""
    _check(q, k, v, slopes, initial_state)
    B, T, H, D = q.shape
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    idx = torch.arange(T, device=q.device)
    diff = (idx[:, None] - idx[None, :]).float()  # t - s
    mask = torch.exp(-slopes.float()[:, None, None] * diff.clamp(min=0)) * (diff >= 0)  # [H, T, T]
    o = ((qf @ kf.transpose(-1, -2)) * mask) @ vf  # [B, H, T, Dv]
    decay_k = _decay_powers(slopes, T - 1 - idx)  # lambda^(T-1-s): [H, T]
    state = (kf * decay_k[None, :, :, None]).transpose(-1, -2) @ vf  # [B, H, D, Dv]
    if initial_state is not None:
        s0 = initial_state.float()
        o = o + (qf * _decay_powers(slopes, idx + 1)[None, :, :, None]) @ s0
        state = state + _decay_powers(slopes, torch.tensor([T], device=q.device))[None, :, :, None] * s0
    return o.transpose(1, 2).to(q.dtype), state


def _block_masks(slopes: torch.Tensor, m: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """For a block of m tokens (local index a): the intra-block decay mask M_ab = lambda^(a-b) for
    a >= b [H, m, m], lambda^(a+1) [H, m] (reading the carried state), lambda^(m-1-a) [H, m] (writing
    it) and lambda^m [H] (decaying it): built once per call, not once per block."""
    a = torch.arange(m, device=device)
    diff = (a[:, None] - a[None, :]).float()
    mask = torch.exp(-slopes.float()[:, None, None] * diff.clamp(min=0)) * (diff >= 0)
    return mask, _decay_powers(slopes, a + 1), _decay_powers(slopes, m - 1 - a), torch.exp(-slopes.float() * m)


def _blocks(T: int, block_size: int, slopes: torch.Tensor, device: torch.device):  # noqa: ANN202 - a generator
    """(start, m, masks) for each block; the full-size blocks share one set of masks."""
    full = _block_masks(slopes, min(block_size, T), device) if T else None
    for start in range(0, T, block_size):
        m = min(block_size, T - start)
        yield start, m, (full if m == full[0].shape[-1] else _block_masks(slopes, m, device))


def lightning_blockwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                        initial_state: torch.Tensor | None = None,
                        block_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Block form. Within a block of m tokens (local indices a, b):
    O = (Q * lambda^(a+1)) S_prev + ((Q K^T) * M) V,  M_ab = lambda^(a-b) for a >= b,
    S_new = lambda^m S_prev + (K * lambda^(m-1-b))^T V.
    """
    _check(q, k, v, slopes, initial_state)
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    state = (initial_state.float() if initial_state is not None
             else torch.zeros(B, H, D, Dv, device=q.device, dtype=torch.float32))
    outs = []
    for start, m, (mask, read, write, block_decay) in _blocks(T, block_size, slopes, q.device):
        qb, kb, vb = (x[:, :, start:start + m] for x in (qf, kf, vf))  # [B, H, m, D]
        intra = ((qb @ kb.transpose(-1, -2)) * mask) @ vb
        inter = (qb * read[None, :, :, None]) @ state
        outs.append(intra + inter)
        state = block_decay[None, :, None, None] * state + (kb * write[None, :, :, None]).transpose(-1, -2) @ vb
    o = torch.cat(outs, dim=2) if outs else qf.new_zeros(B, H, 0, Dv)
    return o.transpose(1, 2).to(q.dtype), state


def lightning_segmented(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                        segment_ids: torch.Tensor, block_size: int = 256) -> torch.Tensor:
    """Block form over rows of several documents: segment_ids [B, T] (equal ids = one document,
    each document contiguous) and every document computed as if alone, from a zero state. In a
    block, with g the segment of each token and g_prev that of the token before the block:
    O_a = [g_a = g_prev] (Q_a * lambda^(a+1)) S_prev + sum_b [g_a = g_b] ((Q K^T) * M)_ab V_b,
    S_new = [g_last = g_prev] lambda^m S_prev + sum_b [g_b = g_last] (K_b lambda^(m-1-b))^T V_b,
    so the carried state only ever holds the tokens of the document it is carried into.
    Returns o [B, T, H, D] in q's dtype."""
    _check(q, k, v, slopes, None)
    B, T, H, D = q.shape
    if segment_ids.shape != (B, T):
        raise ValueError(f"segment_ids must be [B, T] = {[B, T]}: got {list(segment_ids.shape)}")
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    state = torch.zeros(B, H, D, v.shape[-1], device=q.device, dtype=torch.float32)
    prev = torch.full((B, 1), -1, dtype=segment_ids.dtype, device=q.device)  # no document before the row
    outs = []
    for start, m, (mask, read, write, block_decay) in _blocks(T, block_size, slopes, q.device):
        qb, kb, vb = (x[:, :, start:start + m] for x in (qf, kf, vf))  # [B, H, m, D]
        g = segment_ids[:, start:start + m]  # [B, m]
        same = (g[:, :, None] == g[:, None, :]).float()[:, None]  # [B, 1, m, m]
        carried = (g == prev).float()[:, None, :, None]  # [B, 1, m, 1]: token a continues the carried document
        intra = ((qb @ kb.transpose(-1, -2)) * (mask * same)) @ vb
        outs.append(intra + carried * ((qb * read[None, :, :, None]) @ state))
        last = g[:, -1:]  # [B, 1]
        keep = (last == prev).float()[:, :, None, None]  # [B, 1, 1, 1]
        tail = (g == last).float()[:, None, :, None]  # [B, 1, m, 1]: the last document's tokens in the block
        state = (keep * block_decay[None, :, None, None]) * state + \
            (kb * write[None, :, :, None] * tail).transpose(-1, -2) @ vb
        prev = last
    o = torch.cat(outs, dim=2) if outs else qf.new_zeros(B, H, 0, v.shape[-1])
    return o.transpose(1, 2).to(q.dtype)


def lightning_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                   state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step for a batch of states: q, k, v [B, H, D], state [B, H, D, Dv] fp32.
    Returns (o [B, H, Dv] in q's dtype, new state); the state argument is not modified."""
    decay = torch.exp(-slopes.float())[None, :, None, None]
    new_state = decay * state + k.float()[..., :, None] * v.float()[..., None, :]
    o = (q.float()[..., None, :] @ new_state).squeeze(-2)
    return o.to(q.dtype), new_state


def lightning_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                        initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence: the form decoding uses."""
    _check(q, k, v, slopes, initial_state)
    B, T, H, D = q.shape
    state = (initial_state.float() if initial_state is not None
             else torch.zeros(B, H, D, v.shape[-1], device=q.device, dtype=torch.float32))
    outs = []
    for t in range(T):
        o_t, state = lightning_step(q[:, t], k[:, t], v[:, t], slopes, state)
        outs.append(o_t)
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, v.shape[-1])
    return o, state


def check_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int) -> list[int]:
    """The sequence bounds [0, len_0, len_0 + len_1, ..., T] (one host sync), or a ValueError naming
    what is wrong with a packed batch's cu_seqlens."""
    if B != 1:
        raise ValueError(f"with cu_seqlens, q must have batch 1 (packed): got batch {B}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor: got {cu_seqlens.dtype} "
                         f"{list(cu_seqlens.shape)}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T = {T}: got {bounds}")
    return bounds
