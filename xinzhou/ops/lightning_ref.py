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
    a >= b [H, m, m], lambda^(a+1) [H, m] (reading the carried state) and lambda^(m-1-a) [H, m]
    (writing it); the decay from block to block is in `_span`'s weights."""
    a = torch.arange(m, device=device)
    diff = (a[:, None] - a[None, :]).float()
    mask = torch.exp(-slopes.float()[:, None, None] * diff.clamp(min=0)) * (diff >= 0)
    return mask, _decay_powers(slopes, a + 1), _decay_powers(slopes, m - 1 - a)


SPAN_ELEMENTS = 1 << 22  # a span of blocks is computed at once while its largest tensors stay below this


def _span(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, slopes: torch.Tensor, m: int,
          state: torch.Tensor, g: torch.Tensor | None, prev: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """n consecutive blocks of m tokens at once (qf, kf, vf [B, H, n*m, D] fp32; state [B, H, D, Dv]
    carried in; g [B, n*m] segment ids or None for one document; prev [B] the segment of the token
    before the span). Every block's own terms are batched matmuls; the state a block reads is a
    weighted sum of the blocks before it, not a loop:
        S_in_j = sum_{c <= j} w_jc KV_c,  w_jc = lambda^(m (j - c)) [no document starts in blocks c..j-1],
    over the carried state (c = 0) and each block's own KV_c = (K lambda^(m-1-b))^T V (c = block + 1,
    only tokens of its last document); row j = n is the state after the span.
    Returns (o [B, H, n*m, Dv], state after the span)."""
    B, H, L, D = qf.shape
    n, Dv = L // m, vf.shape[-1]
    Q, K, V = (x.reshape(B, H, n, m, -1) for x in (qf, kf, vf))  # [B, H, n, m, D]
    mask, read, write = _block_masks(slopes, m, qf.device)
    intra_mask = mask[None, :, None]  # [1, H, 1, m, m]
    c = torch.arange(n + 1, device=qf.device)
    gap = c[:, None] - c[None, :]  # j - c: [n + 1, n + 1]
    w = torch.exp(-slopes.float()[:, None, None] * (m * gap.clamp(min=0))) * (gap >= 0)  # [H, n + 1, n + 1]
    carried = tail = None
    if g is not None:  # which tokens of a block see the carried state, which reach the next block
        g = g.view(B, n, m)
        same = (g[..., :, None] == g[..., None, :])[:, None]  # [B, 1, n, m, m]
        intra_mask = intra_mask * same
        before = torch.cat([prev[:, None], g[:, :-1, -1]], 1)  # [B, n]: the segment before each block
        last = g[:, :, -1]
        carried = (g == before[..., None])[:, None, :, :, None]  # [B, 1, n, m, 1]
        tail = (g == last[..., None])[:, None, :, :, None]
        starts = torch.cat([torch.zeros_like(last[:, :1]), torch.cumsum(last != before, 1)], 1)  # [B, n + 1]
        w = w * (starts[:, :, None] == starts[:, None, :])[:, None]  # [B, H, n + 1, n + 1]
    intra = ((Q @ K.transpose(-1, -2)) * intra_mask) @ V  # [B, H, n, m, Dv]
    Kw = K * write[None, :, None, :, None]
    kv = (Kw if tail is None else Kw * tail).transpose(-1, -2) @ V  # [B, H, n, D, Dv]
    kv = torch.cat([state[:, :, None], kv], dim=2).reshape(B, H, n + 1, D * Dv)
    states = (w @ kv).view(B, H, n + 1, D, Dv)  # what each block reads; the last row: after the span
    inter = (Q * read[None, :, None, :, None]) @ states[:, :, :n]
    if carried is not None:
        inter = inter * carried
    return (intra + inter).reshape(B, H, L, Dv), states[:, :, n]


def _block_form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                initial_state: torch.Tensor | None, block_size: int,
                segment_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The block form over the whole sequence: spans of as many full blocks as fit SPAN_ELEMENTS
    (one span for training windows; one block at a time for a long prefill), then the last,
    shorter block on its own."""
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    state = (initial_state.float() if initial_state is not None
             else torch.zeros(B, H, D, Dv, device=q.device, dtype=torch.float32))
    m = min(block_size, T) if T else 1
    per_block = B * H * max(m * m, D * Dv)
    span = m * max(1, SPAN_ELEMENTS // per_block)
    prev = None if segment_ids is None else torch.full((B,), -1, dtype=segment_ids.dtype, device=q.device)
    outs, start = [], 0
    while start < T:
        length = min(span, (T - start) // m * m) or T - start  # full blocks, or the short last one
        mm = min(m, length)
        g = None if segment_ids is None else segment_ids[:, start:start + length]
        o, state = _span(*(x[:, :, start:start + length] for x in (qf, kf, vf)), slopes, mm, state, g, prev)
        outs.append(o)
        if g is not None:
            prev = g[:, -1]
        start += length
    o = torch.cat(outs, dim=2) if len(outs) > 1 else (outs[0] if outs else qf.new_zeros(B, H, 0, Dv))
    return o.transpose(1, 2).to(q.dtype), state


def lightning_blockwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                        initial_state: torch.Tensor | None = None,
                        block_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Block form. Within a block of m tokens (local indices a, b):
    O = (Q * lambda^(a+1)) S_prev + ((Q K^T) * M) V,  M_ab = lambda^(a-b) for a >= b,
    S_new = lambda^m S_prev + (K * lambda^(m-1-b))^T V
    (blocks of a span computed together, see `_span`)."""
    _check(q, k, v, slopes, initial_state)
    return _block_form(q, k, v, slopes, initial_state, block_size, None)


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
    return _block_form(q, k, v, slopes, None, block_size, segment_ids)[0]


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
