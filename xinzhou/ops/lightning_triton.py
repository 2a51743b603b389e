"""Lightning attention in Triton: fused chunked forward and backward (varlen, initial/final states), decode.

Computes exactly the recurrence of `ops/lightning_ref.py` (S_t = lambda*S_{t-1} + k_t^T v_t,
o_t = q_t S_t, lambda_h = exp(-slope_h), no scale) in chunks of BT = 64 tokens.
Legend: B batch, T tokens, H heads, K key dim, V value dim, N sequences, c chunk, a/b token indices
inside a chunk of n <= BT valid tokens (a: the query side, b: the key side), h_c the state before
chunk c, g_c the gradient of the state after chunk c, M_ab = lambda^(a-b) for a >= b else 0.

Design: one program walks the chunks of a stretch of one sequence in order and keeps the state
in registers (fp32), so no per-chunk state ever goes to memory (fla's chunk kernels write and
re-read a [K, V] state per chunk; MiniMax's decay is a constant per head, which is what lets the
recurrence stay inside one program). A program uses most of an SM's registers, so one runs per SM.
When B*H is too small to give every SM a program, each sequence is cut into segments of SEG tokens
(a multiple of BT), as many as fill the SMs once, that run in parallel: a pre-pass sums each
segment's own contribution to the state (one more read of two inputs), and a program finds its
start state from the sums of the segments before it (after it, going backwards). With B*H large
enough there is one segment per sequence and no pre-pass. Grids put a segment's V (or K) blocks
side by side, so the programs that re-read the same q/k tiles share them through L2.

Forward:
    _segment_sum_kernel  (segmented only) E_s = sum_{t in s} lambda^(end_s - 1 - t) k_t^T v_t
    _fwd_kernel          per (segment, head, V block): h = lambda^start h0 + sum_{j<s} lambda^(..) E_j;
                         for each chunk: O_c = (Q_c h) * lambda^(a+1) + ((Q_c K_c^T) * M) V_c,
                                         h <- lambda^n h + (K_c * lambda^(n-1-b))^T V_c
Backward (dO given; dh_T the gradient of the final state):
    _segment_sum_kernel  (segmented only) E_s again, and G_s = sum_{t in s} lambda^(t + 1 - start_s) q_t^T do_t
    _bwd_dq_kernel       forwards, per K block: dQ_c = (dO_c h^T) * lambda^(a+1) + ((dO_c V_c^T) * M) K_c
    _bwd_dk_kernel       backwards, per K block: dK_c = (V_c g^T) * lambda^(n-1-b) + ((dO_c V_c^T) * M)^T Q_c
    _bwd_dv_kernel       backwards, per V block: dV_c = (K_c g) * lambda^(n-1-b) + ((K_c Q_c^T) * M^T) dO_c
                         both with g <- lambda^n g + (Q_c * lambda^(a+1))^T dO_c; d(initial state) = g at
                         the start, written by _bwd_dk_kernel
Decode: _decode_kernel, one token per sequence, state updated in place.
Under torch.compile the launches are torch.library ops (xinzhou::lightning_forward / lightning_backward /
lightning_decode) with fake implementations and autograd, so the compiler keeps them inside one graph.

Matmul operands are in the input dtype (the state is rounded to it for the Q h products, as fla
does), accumulation and states in fp32; fp32 inputs use IEEE fp32 dots (no TF32); float16 inputs are
computed in bfloat16 (a state rounded to float16 overflows). Head dims up to 256,
of any size (tiles are masked). CPU tensors work under TRITON_INTERPRET=1 (set before triton is imported).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from xinzhou.ops import on_device, sm_count
from xinzhou.ops.lightning_ref import check_cu_seqlens

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BT = 64  # chunk length
MAX_HEAD_DIM = 256
MIN_SEGMENT = 4 * BT  # shorter segments would spend more on the pre-pass than they win in parallelism
SEGMENT_LEN: int | None = None  # tests set this (a multiple of BT) to force a segment length


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel fills comes from here, so tests can poison them with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


def _p2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))  # tl.dot needs tiles of at least 16


# The interpreter multiplies bfloat16 tiles as raw uint16 bits (triton 3.9), so there dots take fp32
# copies of their operands; on the GPU they run in the input dtype.
_UPCAST_DOTS = tl.constexpr(INTERPRET)


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    if _UPCAST_DOTS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


# ---------------------------------------------------------------------------------------------
# Launch configurations. A sequential kernel carries one fp32 tile of the state ([full K, BV] or
# [BK, full V]) in registers for its whole loop; configs where that tile takes more than
# CARRIED_REGS registers a thread are pruned (on sm_90a those are the ones ptxas spills for; see
# benchmarks/sm90_report.py). Three pipeline stages never paid for their shared memory there.
CARRIED_REGS = 32
NOMINAL_BLOCK = 64  # the V block assumed when counting programs to choose segments


# XINZHOU_AUTOTUNE=0: one config per kernel (the smallest tile, 8 warps, 2 stages), for test runs on
# a GPU that would otherwise compile and time every config for every shape they try
AUTOTUNE = os.environ.get("XINZHOU_AUTOTUNE", "1") != "0"


def _configs(names: tuple[str, str], tiles: tuple[tuple[int, int], ...]) -> list[triton.Config]:
    if INTERPRET:  # one config; small blocks make the tests cross block boundaries
        return [triton.Config({names[0]: 16, names[1]: 16})]
    return [triton.Config({names[0]: a, names[1]: b}, num_warps=w, num_stages=s)
            for a, b in tiles for w in (8, 4) for s in (2, 1)][:None if AUTOTUNE else 1]


def _prune_carried(block: str, full: str, other: str):
    """Keep configs whose carried tile [p2(full), block] fits CARRIED_REGS fp32 registers a thread."""
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        span, limit = _p2(args[full]), _p2(args[other])
        kept = [c for c in configs if c.kwargs[block] <= limit
                and span * c.kwargs[block] <= CARRIED_REGS * 32 * c.num_warps]
        return kept or [min(configs, key=lambda c: (c.kwargs[block], -c.num_warps))]
    return prune


def _prune_sum(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    dx, dy = _p2(args["DX"]), _p2(args["DY"])
    kept = [c for c in configs if c.kwargs["BX"] <= dx and c.kwargs["BY"] <= dy]
    return kept or [min(configs, key=lambda c: (c.kwargs["BX"], c.kwargs["BY"]))]


def _seq_configs(block: str) -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({block: 16})]
    configs = [triton.Config({block: b}, num_warps=w, num_stages=s) for b in (32, 64, 128) for w in (8, 4)
               for s in (2, 1)]
    return configs if AUTOTUNE else configs[:1]


def _tune_bucket(seg: int) -> int:
    """Autotuning key for the chunks a program walks (1, 2-3, 4-7, ... chunks): the best pipelining
    for 4 chunks need not be the best for 200."""
    return min(max(seg // BT, 1).bit_length(), 8)


# ---------------------------------------------------------------------------------------------
# Kernels

@triton.jit
def _locate(i_s, cu_seqlens, seg_offsets, seg_seq, T, SEG, IS_VARLEN: tl.constexpr):
    """Segment row i_s -> (sequence, segment index j in it, its number of segments, row of its first
    segment, first token of the sequence, sequence length, segment start in the sequence, segment length)."""
    if IS_VARLEN:
        i_n = tl.load(seg_seq + i_s)
        row0 = tl.load(seg_offsets + i_n)
        n_segs = tl.load(seg_offsets + i_n + 1) - row0
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        n_segs = tl.maximum(tl.cdiv(T, SEG), 1)
        i_n = i_s // n_segs
        row0 = i_n * n_segs
        bos = i_n.to(tl.int64) * T
        seq_len = T
    j = i_s - row0
    start = j * SEG
    return i_n, j, n_segs, row0, bos, seq_len, start, tl.minimum(SEG, seq_len - start)


@triton.autotune(configs=_configs(("BX", "BY"), ((64, 64), (64, 128), (128, 64), (128, 128))),
                 key=["H", "DX", "DY", "IS_VARLEN", "REVERSE", "TUNE"],
                 prune_configs_by={"early_config_prune": _prune_sum})
@triton.jit
def _segment_sum_kernel(x, y, out, slopes, cu_seqlens, seg_offsets, seg_seq, T, SEG, TUNE,
                        H: tl.constexpr, DX: tl.constexpr, DY: tl.constexpr, BT: tl.constexpr,
                        BX: tl.constexpr, BY: tl.constexpr, REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr,
                        PREC: tl.constexpr):
    """out[s] = sum over the segment's tokens t of w_t x_t^T y_t, w_t = lambda^(end - 1 - t) (the
    segment's state from zero) or, REVERSE, lambda^(t + 1 - start) (its gradient at the start from zero).
    Only rows another segment reads are computed: not the last of a sequence (first, REVERSE)."""
    n_xy = tl.cdiv(DX, BX) * tl.cdiv(DY, BY)
    i_s, i_xy, i_h = tl.program_id(0) // n_xy, tl.program_id(0) % n_xy, tl.program_id(1)
    i_n, j, n_segs, row0, bos, seq_len, start, seg_len = _locate(i_s, cu_seqlens, seg_offsets, seg_seq,
                                                                   T, SEG, IS_VARLEN)
    if REVERSE:
        needed = j > 0
    else:
        needed = j < n_segs - 1
    if needed:
        n_y = tl.cdiv(DY, BY)
        o_t = tl.arange(0, BT)
        o_x = (i_xy // n_y) * BX + tl.arange(0, BX)
        o_y = (i_xy % n_y) * BY + tl.arange(0, BY)
        m_x, m_y = o_x < DX, o_y < DY
        slope = tl.load(slopes + i_h).to(tl.float32)
        acc = tl.zeros([BX, BY], dtype=tl.float32)
        for c in range(0, tl.cdiv(seg_len, BT)):
            tok = bos + start + c * BT
            pos = c * BT + o_t  # position in the segment
            m_t = pos < seg_len
            if REVERSE:
                w = tl.exp(-slope * (pos + 1).to(tl.float32))
            else:
                w = tl.exp(-slope * (seg_len - 1 - pos).to(tl.float32))
            w = tl.where(m_t, w, 0.)
            b_x = tl.load(x + (tok * H + i_h) * DX + o_t[:, None] * (H * DX) + o_x[None, :],
                          mask=m_t[:, None] & m_x[None, :], other=0.)
            b_y = tl.load(y + (tok * H + i_h) * DY + o_t[:, None] * (H * DY) + o_y[None, :],
                          mask=m_t[:, None] & m_y[None, :], other=0.)
            acc += _dot(tl.trans((b_x * w[:, None]).to(b_x.dtype)), b_y, PREC)
        tl.store(out + (i_s.to(tl.int64) * H + i_h) * DX * DY + o_x[:, None] * DY + o_y[None, :], acc,
                 mask=m_x[:, None] & m_y[None, :])


@triton.jit
def _start_state(sums, h0, slope, i_h, i_n, j, row0, SEG, o_r, o_c, m, H: tl.constexpr, K: tl.constexpr,
                 V: tl.constexpr, USE_H0: tl.constexpr, SEGMENTED: tl.constexpr):
    """State tile [rows o_r of K, cols o_c of V] at the start of segment j: lambda^start h0 plus the
    decayed sums E of the segments before it (all full, SEG tokens long)."""
    off = o_r[:, None] * V + o_c[None, :]
    b_h = tl.zeros([o_r.shape[0], o_c.shape[0]], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + (i_n.to(tl.int64) * H + i_h) * K * V + off, mask=m, other=0.) * \
            tl.exp(-slope * (j * SEG).to(tl.float32))
    if SEGMENTED:
        for jj in range(0, j):
            b_h += tl.load(sums + ((row0 + jj).to(tl.int64) * H + i_h) * K * V + off, mask=m, other=0.) * \
                tl.exp(-slope * ((j - 1 - jj) * SEG).to(tl.float32))
    return b_h


@triton.jit
def _end_gradient(sums, dht, slope, i_h, i_n, j, n_segs, row0, SEG, seq_len, seg_end, o_r, o_c, m,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, USE_GT: tl.constexpr,
                  SEGMENTED: tl.constexpr):
    """Gradient tile of the state at the end of segment j: lambda^(tokens after it) dh_T plus the
    decayed sums G of the segments after it."""
    off = o_r[:, None] * V + o_c[None, :]
    b_g = tl.zeros([o_r.shape[0], o_c.shape[0]], dtype=tl.float32)
    if USE_GT:
        b_g += tl.load(dht + (i_n.to(tl.int64) * H + i_h) * K * V + off, mask=m, other=0.) * \
            tl.exp(-slope * (seq_len - seg_end).to(tl.float32))
    if SEGMENTED:
        for jj in range(j + 1, n_segs):
            b_g += tl.load(sums + ((row0 + jj).to(tl.int64) * H + i_h) * K * V + off, mask=m, other=0.) * \
                tl.exp(-slope * ((jj - j - 1) * SEG).to(tl.float32))
    return b_g


@triton.autotune(configs=_seq_configs("BV"), key=["H", "K", "V", "IS_VARLEN", "SEGMENTED", "TUNE"],
                 prune_configs_by={"early_config_prune": _prune_carried("BV", "K", "V")})
@triton.jit
def _fwd_kernel(q, k, v, o, slopes, h0, sums, ht, cu_seqlens, seg_offsets, seg_seq, T, SEG, TUNE,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr,
                BV: tl.constexpr, USE_H0: tl.constexpr, SEGMENTED: tl.constexpr, STORE_HT: tl.constexpr,
                IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_s, i_v, i_h = tl.program_id(0) // tl.cdiv(V, BV), tl.program_id(0) % tl.cdiv(V, BV), tl.program_id(1)
    i_n, j, n_segs, row0, bos, seq_len, start, seg_len = _locate(i_s, cu_seqlens, seg_offsets, seg_seq,
                                                                   T, SEG, IS_VARLEN)
    slope = tl.load(slopes + i_h).to(tl.float32)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, KP)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv_off = o_k[:, None] * V + o_v[None, :]
    diff = o_t[:, None] - o_t[None, :]  # a - b
    decay_m = tl.where(diff >= 0, tl.exp(-slope * tl.maximum(diff, 0).to(tl.float32)), 0.)  # M
    decay_q = tl.exp(-slope * (o_t + 1).to(tl.float32))  # lambda^(a+1)

    b_h = _start_state(sums, h0, slope, i_h, i_n, j, row0, SEG, o_k, o_v, m_kv, H, K, V, USE_H0, SEGMENTED)
    for c in range(0, tl.cdiv(seg_len, BT)):
        tok = bos + start + c * BT  # int64: first token of the chunk
        n = tl.minimum(seg_len - c * BT, BT)
        m_t = o_t < n
        b_q = tl.load(q + (tok * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.)
        b_k = tl.load(k + (tok * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.)
        b_v = tl.load(v + (tok * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :],
                      mask=m_t[:, None] & m_v[None, :], other=0.)
        b_a = (_dot(b_q, tl.trans(b_k), PREC) * decay_m).to(b_v.dtype)
        b_o = _dot(b_q, b_h.to(b_q.dtype), PREC) * decay_q[:, None] + _dot(b_a, b_v, PREC)
        tl.store(o + (tok * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :], b_o.to(o.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])
        decay_k = tl.where(m_t, tl.exp(-slope * (n - 1 - o_t).to(tl.float32)), 0.)  # lambda^(n-1-b)
        b_h = b_h * tl.exp(-slope * n.to(tl.float32)) + \
            _dot(tl.trans((b_k * decay_k[:, None]).to(b_k.dtype)), b_v, PREC)
    if STORE_HT:
        if j == n_segs - 1:
            tl.store(ht + (i_n.to(tl.int64) * H + i_h) * K * V + kv_off, b_h, mask=m_kv)


@triton.autotune(configs=_seq_configs("BK"), key=["H", "K", "V", "IS_VARLEN", "SEGMENTED", "TUNE"],
                 prune_configs_by={"early_config_prune": _prune_carried("BK", "V", "K")})
@triton.jit
def _bwd_dq_kernel(k, v, do, dq, slopes, h0, sums, cu_seqlens, seg_offsets, seg_seq, T, SEG, TUNE,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, VP: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, USE_H0: tl.constexpr, SEGMENTED: tl.constexpr, IS_VARLEN: tl.constexpr,
                   PREC: tl.constexpr):
    i_s, i_k, i_h = tl.program_id(0) // tl.cdiv(K, BK), tl.program_id(0) % tl.cdiv(K, BK), tl.program_id(1)
    i_n, j, n_segs, row0, bos, seq_len, start, seg_len = _locate(i_s, cu_seqlens, seg_offsets, seg_seq,
                                                                   T, SEG, IS_VARLEN)
    slope = tl.load(slopes + i_h).to(tl.float32)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, VP)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    diff = o_t[:, None] - o_t[None, :]  # a - b
    decay_m = tl.where(diff >= 0, tl.exp(-slope * tl.maximum(diff, 0).to(tl.float32)), 0.)
    decay_q = tl.exp(-slope * (o_t + 1).to(tl.float32))

    b_h = _start_state(sums, h0, slope, i_h, i_n, j, row0, SEG, o_k, o_v, m_kv, H, K, V, USE_H0, SEGMENTED)
    for c in range(0, tl.cdiv(seg_len, BT)):
        tok = bos + start + c * BT
        n = tl.minimum(seg_len - c * BT, BT)
        m_t = o_t < n
        b_k = tl.load(k + (tok * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.)
        b_v = tl.load(v + (tok * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :],
                      mask=m_t[:, None] & m_v[None, :], other=0.)
        b_do = tl.load(do + (tok * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :],
                       mask=m_t[:, None] & m_v[None, :], other=0.)
        b_ds = (_dot(b_do, tl.trans(b_v), PREC) * decay_m).to(b_k.dtype)  # (dO V^T) * M: [a, b]
        b_dq = _dot(b_do, tl.trans(b_h.to(b_do.dtype)), PREC) * decay_q[:, None] + _dot(b_ds, b_k, PREC)
        tl.store(dq + (tok * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :], b_dq.to(dq.dtype.element_ty),
                 mask=m_t[:, None] & m_k[None, :])
        decay_k = tl.where(m_t, tl.exp(-slope * (n - 1 - o_t).to(tl.float32)), 0.)
        b_h = b_h * tl.exp(-slope * n.to(tl.float32)) + \
            _dot(tl.trans((b_k * decay_k[:, None]).to(b_k.dtype)), b_v, PREC)


@triton.autotune(configs=_seq_configs("BK"), key=["H", "K", "V", "IS_VARLEN", "SEGMENTED", "TUNE"],
                 prune_configs_by={"early_config_prune": _prune_carried("BK", "V", "K")})
@triton.jit
def _bwd_dk_kernel(q, v, do, dk, slopes, sums, dht, dh0, cu_seqlens, seg_offsets, seg_seq, T, SEG, TUNE,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, VP: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, USE_GT: tl.constexpr, SEGMENTED: tl.constexpr, STORE_DH0: tl.constexpr,
                   IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_s, i_k, i_h = tl.program_id(0) // tl.cdiv(K, BK), tl.program_id(0) % tl.cdiv(K, BK), tl.program_id(1)
    i_n, j, n_segs, row0, bos, seq_len, start, seg_len = _locate(i_s, cu_seqlens, seg_offsets, seg_seq,
                                                                   T, SEG, IS_VARLEN)
    slope = tl.load(slopes + i_h).to(tl.float32)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, VP)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    diff = o_t[:, None] - o_t[None, :]  # a - b
    decay_m = tl.where(diff >= 0, tl.exp(-slope * tl.maximum(diff, 0).to(tl.float32)), 0.)
    decay_q = tl.exp(-slope * (o_t + 1).to(tl.float32))

    b_g = _end_gradient(sums, dht, slope, i_h, i_n, j, n_segs, row0, SEG, seq_len, start + seg_len,
                        o_k, o_v, m_kv, H, K, V, USE_GT, SEGMENTED)
    n_chunks = tl.cdiv(seg_len, BT)
    for r in range(0, n_chunks):
        c = n_chunks - 1 - r
        tok = bos + start + c * BT
        n = tl.minimum(seg_len - c * BT, BT)
        m_t = o_t < n
        b_q = tl.load(q + (tok * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.)
        b_v = tl.load(v + (tok * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :],
                      mask=m_t[:, None] & m_v[None, :], other=0.)
        b_do = tl.load(do + (tok * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :],
                       mask=m_t[:, None] & m_v[None, :], other=0.)
        b_ds = (_dot(b_do, tl.trans(b_v), PREC) * decay_m).to(b_q.dtype)  # [a, b]
        decay_k = tl.where(m_t, tl.exp(-slope * (n - 1 - o_t).to(tl.float32)), 0.)
        b_dk = _dot(b_v, tl.trans(b_g.to(b_v.dtype)), PREC) * decay_k[:, None] + _dot(tl.trans(b_ds), b_q, PREC)
        tl.store(dk + (tok * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :], b_dk.to(dk.dtype.element_ty),
                 mask=m_t[:, None] & m_k[None, :])
        b_g = b_g * tl.exp(-slope * n.to(tl.float32)) + \
            _dot(tl.trans((b_q * decay_q[:, None]).to(b_q.dtype)), b_do, PREC)
    if STORE_DH0:
        if j == 0:
            tl.store(dh0 + (i_n.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :], b_g, mask=m_kv)


@triton.autotune(configs=_seq_configs("BV"), key=["H", "K", "V", "IS_VARLEN", "SEGMENTED", "TUNE"],
                 prune_configs_by={"early_config_prune": _prune_carried("BV", "K", "V")})
@triton.jit
def _bwd_dv_kernel(q, k, do, dv, slopes, sums, dht, cu_seqlens, seg_offsets, seg_seq, T, SEG, TUNE,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr,
                   BV: tl.constexpr, USE_GT: tl.constexpr, SEGMENTED: tl.constexpr, IS_VARLEN: tl.constexpr,
                   PREC: tl.constexpr):
    i_s, i_v, i_h = tl.program_id(0) // tl.cdiv(V, BV), tl.program_id(0) % tl.cdiv(V, BV), tl.program_id(1)
    i_n, j, n_segs, row0, bos, seq_len, start, seg_len = _locate(i_s, cu_seqlens, seg_offsets, seg_seq,
                                                                   T, SEG, IS_VARLEN)
    slope = tl.load(slopes + i_h).to(tl.float32)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, KP)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    diff = o_t[None, :] - o_t[:, None]  # a - b, rows are b
    decay_mt = tl.where(diff >= 0, tl.exp(-slope * tl.maximum(diff, 0).to(tl.float32)), 0.)  # M^T
    decay_q = tl.exp(-slope * (o_t + 1).to(tl.float32))

    b_g = _end_gradient(sums, dht, slope, i_h, i_n, j, n_segs, row0, SEG, seq_len, start + seg_len,
                        o_k, o_v, m_kv, H, K, V, USE_GT, SEGMENTED)
    n_chunks = tl.cdiv(seg_len, BT)
    for r in range(0, n_chunks):
        c = n_chunks - 1 - r
        tok = bos + start + c * BT
        n = tl.minimum(seg_len - c * BT, BT)
        m_t = o_t < n
        b_q = tl.load(q + (tok * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.)
        b_k = tl.load(k + (tok * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.)
        b_do = tl.load(do + (tok * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :],
                       mask=m_t[:, None] & m_v[None, :], other=0.)
        b_a = (_dot(b_k, tl.trans(b_q), PREC) * decay_mt).to(b_do.dtype)  # (K Q^T) * M^T: [b, a]
        decay_k = tl.where(m_t, tl.exp(-slope * (n - 1 - o_t).to(tl.float32)), 0.)
        b_dv = _dot(b_k, b_g.to(b_k.dtype), PREC) * decay_k[:, None] + _dot(b_a, b_do, PREC)
        tl.store(dv + (tok * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :], b_dv.to(dv.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])
        b_g = b_g * tl.exp(-slope * n.to(tl.float32)) + \
            _dot(tl.trans((b_q * decay_q[:, None]).to(b_q.dtype)), b_do, PREC)


@triton.jit
def _decode_kernel(q, k, v, state, o, slopes, slots, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, HAS_SLOTS: tl.constexpr):
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_h = i_bh % H
    slope = tl.load(slopes + i_h).to(tl.float32)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    base = i_bh.to(tl.int64)
    if HAS_SLOTS:  # sequence b's state is row slots[b] of a pool
        s_row = tl.load(slots + i_bh // H).to(tl.int64) * H + i_h
    else:
        s_row = base
    b_q = tl.load(q + base * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_k = tl.load(k + base * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_v = tl.load(v + base * V + o_v, mask=m_v, other=0.).to(tl.float32)
    p_s = state + s_row * K * V + o_k[:, None] * V + o_v[None, :]
    b_s = tl.load(p_s, mask=m_kv, other=0.)
    b_s = b_s * tl.exp(-slope) + b_k[:, None] * b_v[None, :]
    tl.store(p_s, b_s, mask=m_kv)
    tl.store(o + base * V + o_v, tl.sum(b_s * b_q[:, None], axis=0).to(o.dtype.element_ty), mask=m_v)


# ---------------------------------------------------------------------------------------------
# Host side

def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"q, k, v must be [B, T, H, D] with equal B, T, H: got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q, k, v must share one dtype of float32/bfloat16/float16: got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"triton lightning attention supports head dims up to {MAX_HEAD_DIM}: got "
                         f"K = {q.shape[-1]}, V = {v.shape[-1]}")
    if slopes.shape != (q.shape[2],):
        raise ValueError(f"slopes must be [H] = [{q.shape[2]}]: got {tuple(slopes.shape)}")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError("triton lightning attention got CPU tensors: set TRITON_INTERPRET=1 before "
                           "triton is first imported to run the kernels on the CPU, or use backend='reference'")


def _precision(dtype: torch.dtype) -> str | None:
    return "ieee" if dtype == torch.float32 else None  # None: tl.dot's default for 16-bit operands


def _segment_len(n_seq: int, total_tokens: int, longest: int, H: int, V: int, device: torch.device) -> int:
    """Tokens per segment. The sequential kernels use most of an SM's registers, so one program runs
    per SM: with at least one program per SM from whole sequences, a whole sequence; else as many
    segments as fill the SMs once (more would add a wave, fewer would idle SMs), none shorter than
    MIN_SEGMENT."""
    if SEGMENT_LEN is not None:
        if SEGMENT_LEN <= 0 or SEGMENT_LEN % BT:
            raise ValueError(f"SEGMENT_LEN must be a positive multiple of {BT}: got {SEGMENT_LEN}")
        return SEGMENT_LEN
    whole = max(BT, triton.cdiv(longest, BT) * BT)
    programs_per_segment = H * triton.cdiv(V, NOMINAL_BLOCK)
    segments = sm_count(device) // programs_per_segment
    if n_seq >= segments:
        return whole
    return min(whole, max(MIN_SEGMENT, triton.cdiv(triton.cdiv(total_tokens, segments), BT) * BT))


class _Layout:
    """Where the sequences lie in q's [B, T] token grid (fixed length: N = B; packed: B = 1) and how
    they are cut into segments: rows of the per-segment buffers, sequence by sequence."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None):
        B, T, H, _ = q.shape
        self.T, self.H = T, H
        self.is_varlen = cu_seqlens is not None
        if cu_seqlens is None:
            self.n_seq = B
            self.seg = _segment_len(B, B * T, T, H, v.shape[-1], q.device)
            per_seq = max(1, triton.cdiv(T, self.seg))
            self.n_rows = B * per_seq
            self.segmented = per_seq > 1
            self.cu_seqlens = self.seg_offsets = self.seg_seq = None
            return
        bounds = [int(x) for x in cu_seqlens.tolist()]  # a host sync; fixed-length calls have none
        lens = [b - a for a, b in zip(bounds, bounds[1:])]
        self.n_seq = len(lens)
        self.seg = _segment_len(len(lens), T, max(lens), H, v.shape[-1], q.device)
        counts = [max(1, triton.cdiv(n, self.seg)) for n in lens]  # an empty sequence still passes its state
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        self.n_rows = offsets[-1]
        self.segmented = max(counts) > 1
        self.cu_seqlens = cu_seqlens
        self.seg_offsets = torch.tensor(offsets, dtype=torch.int32, device=q.device)
        self.seg_seq = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)], dtype=torch.int32,
                                    device=q.device)

    def args(self) -> tuple:
        """The kernels' common arguments: where the segments are, and the autotuning bucket."""
        return self.cu_seqlens, self.seg_offsets, self.seg_seq, self.T, self.seg, _tune_bucket(self.seg)

    def grid(self, dim: int, block: str):
        # axis 0 = (segment row, block), blocks fastest: the programs that share a segment's q/k (or
        # v/dO) tiles run side by side and hit L2; axis 0 is also the only one not capped at 65535
        return lambda meta: (self.n_rows * triton.cdiv(dim, meta[block]), self.H)

    def segment_sums(self, x: torch.Tensor, y: torch.Tensor, slopes: torch.Tensor, reverse: bool) -> torch.Tensor:
        """[rows, H, DX, DY] fp32: each segment's own state (x = k, y = v) or state gradient at its
        start (reverse: x = q, y = do), from zero."""
        DX, DY = x.shape[-1], y.shape[-1]
        out = _empty((self.n_rows, self.H, DX, DY), torch.float32, x.device)
        grid = lambda meta: (self.n_rows * triton.cdiv(DX, meta["BX"]) * triton.cdiv(DY, meta["BY"]), self.H)  # noqa: E731
        _segment_sum_kernel[grid](
            x, y, out, slopes, *self.args(), H=self.H, DX=DX, DY=DY, BT=BT, REVERSE=reverse,
            IS_VARLEN=self.is_varlen, PREC=_precision(x.dtype))
        return out


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, h0: torch.Tensor | None,
             lay: _Layout, store_final: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o and, with store_final, the final states [N, H, K, V] fp32."""
    K, V = q.shape[-1], v.shape[-1]
    o = _empty(v.shape, v.dtype, v.device)
    ht = _empty((lay.n_seq, lay.H, K, V), torch.float32, q.device) if store_final else None
    if lay.n_rows * lay.H == 0:
        return o, ht
    sums = lay.segment_sums(k, v, slopes, reverse=False) if lay.segmented else None
    _fwd_kernel[lay.grid(V, "BV")](
        q, k, v, o, slopes, h0, sums, ht, *lay.args(), H=lay.H, K=K, V=V, KP=_p2(K), BT=BT,
        USE_H0=h0 is not None, SEGMENTED=lay.segmented, STORE_HT=store_final, IS_VARLEN=lay.is_varlen,
        PREC=_precision(q.dtype))
    return o, ht


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, h0: torch.Tensor | None,
              do: torch.Tensor, dht: torch.Tensor | None, lay: _Layout, want_dh0: bool):
    """dq, dk, dv and, with want_dh0, the initial states' gradient. Segmented, the segment sums are
    recomputed (one more read of k, v) rather than kept from the forward."""
    K, V = q.shape[-1], v.shape[-1]
    dq, dk = _empty(q.shape, q.dtype, q.device), _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    dh0 = _empty((lay.n_seq, lay.H, K, V), torch.float32, q.device) if want_dh0 else None
    if lay.n_rows * lay.H == 0:
        return dq, dk, dv, dh0
    states = lay.segment_sums(k, v, slopes, reverse=False) if lay.segmented else None
    grads = lay.segment_sums(q, do, slopes, reverse=True) if lay.segmented else None
    common = {"H": lay.H, "K": K, "V": V, "BT": BT, "SEGMENTED": lay.segmented, "IS_VARLEN": lay.is_varlen,
              "PREC": _precision(q.dtype)}
    _bwd_dq_kernel[lay.grid(K, "BK")](k, v, do, dq, slopes, h0, states, *lay.args(), VP=_p2(V),
                                      USE_H0=h0 is not None, **common)
    _bwd_dk_kernel[lay.grid(K, "BK")](q, v, do, dk, slopes, grads, dht, dh0, *lay.args(), VP=_p2(V),
                                      USE_GT=dht is not None, STORE_DH0=want_dh0, **common)
    _bwd_dv_kernel[lay.grid(V, "BV")](q, k, do, dv, slopes, grads, dht, *lay.args(), KP=_p2(K),
                                      USE_GT=dht is not None, **common)
    return dq, dk, dv, dh0


# ---------------------------------------------------------------------------------------------
# Entry points. Under torch.compile the launches are torch.library ops (opaque to the compiler,
# which then neither traces into the autotuner nor breaks the graph), with fake (shape-only)
# implementations and autograd. Eagerly the same code runs through a plain autograd.Function, which
# costs a fraction of the op dispatch (tens of microseconds a call). Ops return tensors only, so an
# absent optional output is an empty tensor.

def _none_if_empty(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None or t.numel() == 0 else t


def _forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                  initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                  output_final_state: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with on_device(q):
        o, ht = _forward(q, k, v, slopes, initial_state, _Layout(q, v, cu_seqlens), output_final_state)
    return o, ht if ht is not None else q.new_empty(0, dtype=torch.float32)


def _backward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                   initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, do: torch.Tensor,
                   dht: torch.Tensor | None,
                   want_dh0: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with on_device(q):
        dq, dk, dv, dh0 = _backward(q, k, v, slopes, initial_state, do, dht, _Layout(q, v, cu_seqlens), want_dh0)
    return dq, dk, dv, dh0 if dh0 is not None else q.new_empty(0, dtype=torch.float32)


_forward_op = torch.library.custom_op("xinzhou::lightning_forward", _forward_impl, mutates_args=())
_backward_op = torch.library.custom_op("xinzhou::lightning_backward", _backward_impl, mutates_args=())


@_forward_op.register_fake
def _(q, k, v, slopes, initial_state, cu_seqlens, output_final_state):
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    shape = (N, q.shape[2], q.shape[3], v.shape[3]) if output_final_state else (0,)
    return torch.empty_like(v), q.new_empty(shape, dtype=torch.float32)


@_backward_op.register_fake
def _(q, k, v, slopes, initial_state, cu_seqlens, do, dht, want_dh0):
    dh0 = torch.empty_like(initial_state) if want_dh0 else q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dh0


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, slopes, initial_state, cu_seqlens, _ = inputs
    ctx.save_for_backward(q, k, v, slopes, initial_state, cu_seqlens)


def _grads(ctx, do: torch.Tensor | None, dht: torch.Tensor | None, backward) -> tuple:
    """Gradients for (q, k, v, slopes, initial_state, cu_seqlens, output_final_state); slopes get none."""
    q, k, v, slopes, h0, cu_seqlens = ctx.saved_tensors
    do = torch.zeros_like(v) if do is None else do.contiguous()
    dht = _none_if_empty(dht)
    want_dh0 = h0 is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dh0 = backward(q, k, v, slopes, h0, cu_seqlens, do, dht.contiguous() if dht is not None else None,
                               want_dh0)
    return dq, dk, dv, None, _none_if_empty(dh0), None, None


_forward_op.register_autograd(lambda ctx, do, dht: _grads(ctx, do, dht, _backward_op), setup_context=_setup_context)


class _EagerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        _setup_context(ctx, inputs, None)
        ctx.set_materialize_grads(False)
        return _forward_impl(*inputs)

    @staticmethod
    def backward(ctx, do, dht):
        return _grads(ctx, do, dht, _backward_impl)


def chunk_lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                              initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                              cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; slopes [H]; initial_state [N, H, K, V] (N = B, or the number
    of sequences in cu_seqlens with B = 1). Returns (o [B, T, H, V] in q's dtype, final states fp32 or None).
    Slopes get no gradient; q, k, v and the initial state do. float16 inputs are computed in bfloat16:
    the state, rounded to the input dtype for its matmuls, outgrows float16's range (65504) within a
    few hundred tokens of a slowly decaying head."""
    _check_inputs(q, k, v, slopes)
    if q.dtype == torch.float16:
        o, ht = chunk_lightning_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), slopes, initial_state,
                                          output_final_state, cu_seqlens)
        return o.half(), ht
    B, T, H, K = q.shape
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
    N, V = (B if cu_seqlens is None else cu_seqlens.shape[0] - 1), v.shape[-1]
    if initial_state is not None and initial_state.shape != (N, H, K, V):
        raise ValueError(f"initial_state must be [N, H, K, V] = {[N, H, K, V]}: got {list(initial_state.shape)}")
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous() if cu_seqlens is not None else None
    args = (q.contiguous(), k.contiguous(), v.contiguous(), slopes.detach().float().contiguous(), h0, cu,
            output_final_state)
    o, ht = _forward_op(*args) if torch.compiler.is_compiling() else _EagerFunction.apply(*args)
    return o, (ht if output_final_state else None)


def lightning_decode_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                            state: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
    """One step for a batch of states, in place: q, k [B, H, K]; v [B, H, V]; state [B, H, K, V] fp32
    contiguous, or with `slots` ([B] ints, distinct but for rows whose results are thrown away) a
    pool [S, H, K, V] whose row slots[b] is sequence b's state (the engine's cache: read and written
    once, no gather). Returns
    o = q (lambda S + k^T v): [B, H, V] in q's dtype."""
    if q.dim() != 3 or q.shape != k.shape or q.shape[:2] != v.shape[:2]:
        raise ValueError(f"q, k, v must be [B, H, D] with equal B, H: got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, K = q.shape
    V = v.shape[-1]
    rows = B if slots is None else state.shape[0]
    if state.shape != (rows, H, K, V) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 [{'B' if slots is None else 'S'}, H, K, V] = "
                         f"{[rows, H, K, V]}: got {state.dtype} {list(state.shape)}, contiguous={state.is_contiguous()}")
    if slots is not None and (slots.shape != (B,) or slots.dtype not in (torch.int32, torch.int64)
                              or slots.device != q.device):
        raise ValueError(f"slots must be a [B] = [{B}] int32/int64 tensor on {q.device}: got {slots.dtype} "
                         f"{list(slots.shape)} on {slots.device}")
    if max(K, V) > MAX_HEAD_DIM:
        raise ValueError(f"triton lightning decode supports head dims up to {MAX_HEAD_DIM}: got K = {K}, V = {V}")
    if slopes.shape != (H,):
        raise ValueError(f"slopes must be [H] = [{H}]: got {tuple(slopes.shape)}")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError("triton lightning decode got CPU tensors: set TRITON_INTERPRET=1 before triton is "
                           "first imported, or use backend='reference'")
    args = (q.contiguous(), k.contiguous(), v.contiguous(), slopes.detach().float().contiguous(), state,
            None if slots is None else slots.contiguous())
    return _decode_op(*args) if torch.compiler.is_compiling() else _decode_impl(*args)


def _decode_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                 state: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
    B, H, K = q.shape
    V = v.shape[-1]
    o = _empty((B, H, V), q.dtype, q.device)
    if B * H == 0:
        return o
    BK = _p2(K)
    BV = min(_p2(V), 32 if BK <= 128 else 16)  # keeps the fp32 state tile at <= 4K elements per program
    with on_device(q):
        _decode_kernel[(B * H, triton.cdiv(V, BV))](q, k, v, state, o, slopes, slots if slots is not None else o,
                                                    H=H, K=K, V=V, BK=BK, BV=BV, HAS_SLOTS=slots is not None,
                                                    num_warps=4)
    return o


_decode_op = torch.library.custom_op("xinzhou::lightning_decode", _decode_impl, mutates_args=("state",))


@_decode_op.register_fake
def _(q, k, v, slopes, state, slots=None):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
