"""Lightning attention in Triton: chunked forward and backward (varlen, initial/final states) and decode.

Computes exactly the recurrence of `ops/lightning_ref.py` (S_t = lambda*S_{t-1} + k_t^T v_t,
o_t = q_t S_t, lambda_h = exp(-slope_h), no scale) in chunks of BT = 64 tokens.
Legend: B batch, T tokens, H heads, K key dim, V value dim, N sequences, NT chunks, c chunk index,
a/b local token indices inside a chunk of n <= BT valid tokens, h_c the state before chunk c.

Forward (2 kernels):
    _fwd_state_kernel  sequential over chunks per (sequence, head, K block, V block):
                       stores h_c, then h_{c+1} = lambda^n h_c + (K_c * lambda^(n-1-b))^T V_c
    _fwd_out_kernel    parallel over chunks: O_c = (Q_c * lambda^(a+1)) h_c + ((Q_c K_c^T) * M) V_c,
                       M_ab = lambda^(a-b) for a >= b else 0
Backward (4 kernels; h is recomputed rather than kept between forward and backward, as in fla):
    _fwd_state_kernel  again for h_c
    _bwd_state_kernel  sequential, backwards: g_c = gradient of the state at the end of chunk c,
                       g_{c-1} = lambda^n g_c + (Q_c * lambda^(a+1))^T dO_c; d(initial state) = g_{-1}
    _bwd_dv_kernel     dV_c = (K_c g_c) * lambda^(n-1-b) + ((K_c Q_c^T) * M^T) dO_c
    _bwd_dqk_kernel    dQ_c = (dO_c h_c^T) * lambda^(a+1) + ((dO_c V_c^T) * M) K_c
                       dK_c = (V_c g_c^T) * lambda^(n-1-b) + ((dO_c V_c^T) * M)^T Q_c
Decode: _decode_kernel, one token per sequence, state updated in place.

Matmul operands are in the input dtype (h and g are stored in it too, like fla), accumulation and
states in fp32; fp32 inputs use IEEE fp32 dots (no TF32). Head dims up to 256 of any size (tiles are
masked); CPU tensors work under TRITON_INTERPRET=1 (set before triton is imported).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BT = 64  # chunk length
MAX_HEAD_DIM = 256


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


def _state_configs() -> list[triton.Config]:
    # The interpreter runs one config; small blocks there make the tests cross block boundaries.
    # On sm_90 (ptxas -v, bf16, D = 128) BK = 128 spills registers with 4 warps, so it only gets 8.
    if INTERPRET:
        return [triton.Config({"BK": 16, "BV": 16})]
    return [triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=s)
            for bk, bv, w in ((64, 32, 4), (64, 64, 4), (64, 64, 8), (128, 64, 8)) for s in (2, 3)]


def _parallel_configs() -> list[triton.Config]:
    # _bwd_dqk_kernel holds three [BT, BT or BK] fp32 accumulators: 4 warps spill at BK = 64 already
    if INTERPRET:
        return [triton.Config({"BK": 16, "BV": 16})]
    return [triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=s)
            for bk, bv, w in ((64, 64, 4), (64, 64, 8), (128, 64, 8), (128, 128, 8)) for s in (2, 3)]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles wider than the (power-of-2 rounded) head dims; they would only compute padding."""
    args = {**named_args, **kwargs}
    k, v = _p2(args["K"]), _p2(args["V"])
    kept = [c for c in configs if c.kwargs["BK"] <= k and c.kwargs["BV"] <= v]
    if kept:
        return kept
    smallest = min(c.kwargs["BK"] for c in configs), min(c.kwargs["BV"] for c in configs)
    return [c for c in configs if (c.kwargs["BK"], c.kwargs["BV"]) == smallest]


@triton.jit
def _locate_chunk(i_t, i_nh, cu_seqlens, chunk_indices, T, H: tl.constexpr, BT: tl.constexpr,
                  IS_VARLEN: tl.constexpr):
    """Program (chunk i_t, i_nh) -> (head, chunk index in its sequence, first token, sequence
    length, row of the per-chunk state buffers)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        i_h = i_nh
        row = i_t.to(tl.int64)
    else:
        i_n = i_nh // H
        i_h = i_nh % H
        i_c = i_t
        bos = i_n.to(tl.int64) * T
        seq_len = T
        row = i_n.to(tl.int64) * ((T + BT - 1) // BT) + i_t
    return i_h, i_c, bos, seq_len, row


@triton.jit
def _locate_sequence(i_n, cu_seqlens, chunk_offsets, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Sequence i_n -> (first token, length, row of its first chunk in the state buffers)."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = T
        c0 = i_n.to(tl.int64) * ((T + BT - 1) // BT)
    return bos, seq_len, c0


@triton.autotune(configs=_state_configs(), key=["H", "K", "V", "IS_VARLEN"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _fwd_state_kernel(k, v, h, h0, ht, slopes, cu_seqlens, chunk_offsets, T,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, STORE_H: tl.constexpr, USE_H0: tl.constexpr,
                      STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len, c0 = _locate_sequence(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    slope = tl.load(slopes + i_h).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv_off = o_k[:, None] * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + kv_off, mask=m_kv, other=0.).to(tl.float32)
    for i_c in range(0, (seq_len + BT - 1) // BT):
        if STORE_H:
            tl.store(h + ((c0 + i_c) * H + i_h) * K * V + kv_off, b_h.to(h.dtype.element_ty), mask=m_kv)
        m_t = i_c * BT + o_t < seq_len
        tok = bos + i_c * BT  # int64: first token of the chunk
        b_k = tl.load(k + (tok * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.)
        b_v = tl.load(v + (tok * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :],
                      mask=m_t[:, None] & m_v[None, :], other=0.)
        n = tl.minimum(seq_len - i_c * BT, BT)
        d_k = tl.where(m_t, tl.exp(-slope * (n - 1 - o_t).to(tl.float32)), 0.)  # lambda^(n-1-b)
        b_kd = (b_k * d_k[:, None]).to(b_k.dtype)
        b_h = b_h * tl.exp(-slope * n.to(tl.float32)) + _dot(tl.trans(b_kd), b_v, PREC)
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * K * V + kv_off, b_h, mask=m_kv)


@triton.autotune(configs=_parallel_configs(), key=["H", "K", "V", "IS_VARLEN"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _fwd_out_kernel(q, k, v, h, o, slopes, cu_seqlens, chunk_indices, T,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_t, i_nh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h, i_c, bos, seq_len, row = _locate_chunk(i_t, i_nh, cu_seqlens, chunk_indices, T, H, BT, IS_VARLEN)
    slope = tl.load(slopes + i_h).to(tl.float32)
    tok = bos + i_c * BT

    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_v = i_c * BT + o_t < seq_len, o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    p_q = q + (tok * H + i_h) * K
    p_k = k + (tok * H + i_h) * K
    p_h = h + (row * H + i_h) * K * V

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_a = tl.zeros([BT, BT], dtype=tl.float32)  # Q K^T
    for i_k in range(0, (K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(p_q + o_t[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_k = tl.load(p_k + o_t[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)
        b_o += _dot(b_q, b_h.to(b_q.dtype), PREC)
        b_a += _dot(b_q, tl.trans(b_k), PREC)
    b_v = tl.load(v + (tok * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0.)
    diff = o_t[:, None] - o_t[None, :]  # a - b
    b_a = tl.where(diff >= 0, b_a * tl.exp(-slope * tl.maximum(diff, 0).to(tl.float32)), 0.)
    b_o = b_o * tl.exp(-slope * (o_t + 1).to(tl.float32))[:, None]
    b_o += _dot(b_a.to(b_v.dtype), b_v, PREC)
    tl.store(o + (tok * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_tv)


@triton.autotune(configs=_state_configs(), key=["H", "K", "V", "IS_VARLEN"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bwd_state_kernel(q, do, g, gt, g0, slopes, cu_seqlens, chunk_offsets, T,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, USE_GT: tl.constexpr, STORE_G0: tl.constexpr,
                      IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len, c0 = _locate_sequence(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    slope = tl.load(slopes + i_h).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv_off = o_k[:, None] * V + o_v[None, :]
    d_q = tl.exp(-slope * (o_t + 1).to(tl.float32))  # lambda^(a+1)

    b_g = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_GT:
        b_g += tl.load(gt + i_nh.to(tl.int64) * K * V + kv_off, mask=m_kv, other=0.).to(tl.float32)
    n_chunks = (seq_len + BT - 1) // BT
    for j in range(0, n_chunks):
        i_c = n_chunks - 1 - j
        tl.store(g + ((c0 + i_c) * H + i_h) * K * V + kv_off, b_g.to(g.dtype.element_ty), mask=m_kv)
        m_t = i_c * BT + o_t < seq_len
        tok = bos + i_c * BT
        b_q = tl.load(q + (tok * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.)
        b_do = tl.load(do + (tok * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :],
                       mask=m_t[:, None] & m_v[None, :], other=0.)
        n = tl.minimum(seq_len - i_c * BT, BT)
        b_qd = (b_q * d_q[:, None]).to(b_q.dtype)
        b_g = b_g * tl.exp(-slope * n.to(tl.float32)) + _dot(tl.trans(b_qd), b_do, PREC)
    if STORE_G0:
        tl.store(g0 + i_nh.to(tl.int64) * K * V + kv_off, b_g, mask=m_kv)


@triton.autotune(configs=_parallel_configs(), key=["H", "K", "V", "IS_VARLEN"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bwd_dv_kernel(q, k, do, g, dv, slopes, cu_seqlens, chunk_indices, T,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_t, i_nh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h, i_c, bos, seq_len, row = _locate_chunk(i_t, i_nh, cu_seqlens, chunk_indices, T, H, BT, IS_VARLEN)
    slope = tl.load(slopes + i_h).to(tl.float32)
    tok = bos + i_c * BT

    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_v = i_c * BT + o_t < seq_len, o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    p_q = q + (tok * H + i_h) * K
    p_k = k + (tok * H + i_h) * K
    p_g = g + (row * H + i_h) * K * V

    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    b_a = tl.zeros([BT, BT], dtype=tl.float32)  # K Q^T: [b, a]
    for i_k in range(0, (K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(p_q + o_t[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_k = tl.load(p_k + o_t[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_g = tl.load(p_g + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)
        b_dv += _dot(b_k, b_g.to(b_k.dtype), PREC)
        b_a += _dot(b_k, tl.trans(b_q), PREC)
    n = tl.minimum(seq_len - i_c * BT, BT)
    d_k = tl.where(m_t, tl.exp(-slope * (n - 1 - o_t).to(tl.float32)), 0.)  # lambda^(n-1-b)
    diff = o_t[None, :] - o_t[:, None]  # a - b, rows are b
    b_a = tl.where(diff >= 0, b_a * tl.exp(-slope * tl.maximum(diff, 0).to(tl.float32)), 0.)
    b_do = tl.load(do + (tok * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0.)
    b_dv = b_dv * d_k[:, None] + _dot(b_a.to(b_do.dtype), b_do, PREC)
    tl.store(dv + (tok * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :], b_dv.to(dv.dtype.element_ty),
             mask=m_tv)


@triton.autotune(configs=_parallel_configs(), key=["H", "K", "V", "IS_VARLEN"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bwd_dqk_kernel(q, k, v, do, h, g, dq, dk, slopes, cu_seqlens, chunk_indices, T,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_t, i_nh, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h, i_c, bos, seq_len, row = _locate_chunk(i_t, i_nh, cu_seqlens, chunk_indices, T, H, BT, IS_VARLEN)
    slope = tl.load(slopes + i_h).to(tl.float32)
    tok = bos + i_c * BT

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_t, m_k = i_c * BT + o_t < seq_len, o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_v = v + (tok * H + i_h) * V
    p_do = do + (tok * H + i_h) * V
    p_h = h + (row * H + i_h) * K * V
    p_g = g + (row * H + i_h) * K * V

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)  # dO V^T: [a, b]
    for i_v in range(0, (V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = tl.load(p_v + o_t[:, None] * (H * V) + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        b_do = tl.load(p_do + o_t[:, None] * (H * V) + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)
        b_g = tl.load(p_g + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)
        b_ds += _dot(b_do, tl.trans(b_v), PREC)
        b_dq += _dot(b_do, tl.trans(b_h.to(b_do.dtype)), PREC)
        b_dk += _dot(b_v, tl.trans(b_g.to(b_v.dtype)), PREC)
    n = tl.minimum(seq_len - i_c * BT, BT)
    d_k = tl.where(m_t, tl.exp(-slope * (n - 1 - o_t).to(tl.float32)), 0.)  # lambda^(n-1-b)
    d_q = tl.exp(-slope * (o_t + 1).to(tl.float32))  # lambda^(a+1)
    diff = o_t[:, None] - o_t[None, :]  # a - b
    b_q = tl.load(q + (tok * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0.)
    b_k = tl.load(k + (tok * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0.)
    b_ds = tl.where(diff >= 0, b_ds * tl.exp(-slope * tl.maximum(diff, 0).to(tl.float32)), 0.).to(b_q.dtype)
    b_dq = b_dq * d_q[:, None] + _dot(b_ds, b_k, PREC)
    b_dk = b_dk * d_k[:, None] + _dot(tl.trans(b_ds), b_q, PREC)
    out = (tok * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :]
    tl.store(dq + out, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + out, b_dk.to(dk.dtype.element_ty), mask=m_tk)


@triton.jit
def _decode_kernel(q, k, v, state, o, slopes, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr):
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_h = i_bh % H
    slope = tl.load(slopes + i_h).to(tl.float32)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    base = i_bh.to(tl.int64)
    b_q = tl.load(q + base * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_k = tl.load(k + base * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_v = tl.load(v + base * V + o_v, mask=m_v, other=0.).to(tl.float32)
    p_s = state + base * K * V + o_k[:, None] * V + o_v[None, :]
    b_s = tl.load(p_s, mask=m_kv, other=0.)
    b_s = b_s * tl.exp(-slope) + b_k[:, None] * b_v[None, :]
    tl.store(p_s, b_s, mask=m_kv)
    tl.store(o + base * V + o_v, tl.sum(b_s * b_q[:, None], axis=0).to(o.dtype.element_ty), mask=m_v)


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


def _chunk_layout(cu_seqlens: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-sequence first chunk row [N + 1] and per-chunk (sequence, chunk) pairs [NT, 2] (int32)."""
    counts = [triton.cdiv(b - a, BT) for a, b in zip(cu_seqlens, cu_seqlens[1:])]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    pairs = [(i, j) for i, c in enumerate(counts) for j in range(c)]
    chunk_offsets = torch.tensor(offsets, dtype=torch.int32, device=device)
    chunk_indices = torch.tensor(pairs, dtype=torch.int32, device=device).reshape(-1, 2)
    return chunk_offsets, chunk_indices, offsets[-1]


class _Layout:
    """Where the sequences lie in q's [B, T] token grid: fixed length (N = B) or packed (B = 1)."""

    def __init__(self, q: torch.Tensor, cu_seqlens: torch.Tensor | None):
        B, T, H, _ = q.shape
        self.T, self.H = T, H
        self.is_varlen = cu_seqlens is not None
        if cu_seqlens is None:
            self.n_seq, self.n_chunks = B, B * triton.cdiv(T, BT)
            self.cu_seqlens = self.chunk_offsets = self.chunk_indices = None
        else:
            if B != 1:
                raise ValueError(f"with cu_seqlens, q must have batch 1 (packed): got batch {B}")
            bounds = [int(x) for x in cu_seqlens.tolist()]
            if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T or any(
                    b < a for a, b in zip(bounds, bounds[1:])):
                raise ValueError(f"cu_seqlens must rise from 0 to T = {T}: got {bounds}")
            self.n_seq = len(bounds) - 1
            self.cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
            self.chunk_offsets, self.chunk_indices, self.n_chunks = _chunk_layout(bounds, q.device)

    def seq_grid(self, K: int, V: int):
        # the unbounded grid axis is 0 (axes 1 and 2 stop at 65535)
        return lambda meta: (self.n_seq * self.H, triton.cdiv(K, meta["BK"]), triton.cdiv(V, meta["BV"]))

    def chunk_grid(self, dim: int, block: str):
        # fixed length: chunks per sequence x (B*H); packed: all chunks x H (chunk_indices name the sequence)
        n_t = self.n_chunks if self.is_varlen else triton.cdiv(self.T, BT)
        n_nh = self.H if self.is_varlen else self.n_seq * self.H
        return lambda meta: (n_t, n_nh, triton.cdiv(dim, meta[block]))


def _states(k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, h0: torch.Tensor | None,
            lay: _Layout, store_final: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-chunk states h [NT, H, K, V] (input dtype) and optionally the final states [N, H, K, V] fp32."""
    K, V = k.shape[-1], v.shape[-1]
    h = _empty((lay.n_chunks, lay.H, K, V), k.dtype, k.device)
    ht = _empty((lay.n_seq, lay.H, K, V), torch.float32, k.device) if store_final else None
    if lay.n_seq * lay.H > 0:
        _fwd_state_kernel[lay.seq_grid(K, V)](
            k, v, h, h0, ht, slopes, lay.cu_seqlens, lay.chunk_offsets, lay.T, H=lay.H, K=K, V=V, BT=BT,
            STORE_H=True, USE_H0=h0 is not None, STORE_HT=store_final, IS_VARLEN=lay.is_varlen,
            PREC=_precision(k.dtype))
    return h, ht


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, h0: torch.Tensor | None,
             lay: _Layout, store_final: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    K, V = q.shape[-1], v.shape[-1]
    h, ht = _states(k, v, slopes, h0, lay, store_final)
    o = _empty(v.shape, v.dtype, v.device)
    if lay.n_chunks * lay.H > 0:
        _fwd_out_kernel[lay.chunk_grid(V, "BV")](
            q, k, v, h, o, slopes, lay.cu_seqlens, lay.chunk_indices, lay.T, H=lay.H, K=K, V=V, BT=BT,
            IS_VARLEN=lay.is_varlen, PREC=_precision(q.dtype))
    return o, ht


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, h0: torch.Tensor | None,
              do: torch.Tensor, dht: torch.Tensor | None, lay: _Layout, want_dh0: bool):
    K, V = q.shape[-1], v.shape[-1]
    prec = _precision(q.dtype)
    h, _ = _states(k, v, slopes, h0, lay, store_final=False)
    g = _empty((lay.n_chunks, lay.H, K, V), q.dtype, q.device)
    dh0 = _empty((lay.n_seq, lay.H, K, V), torch.float32, q.device) if want_dh0 else None
    if lay.n_seq * lay.H > 0:
        _bwd_state_kernel[lay.seq_grid(K, V)](
            q, do, g, dht, dh0, slopes, lay.cu_seqlens, lay.chunk_offsets, lay.T, H=lay.H, K=K, V=V, BT=BT,
            USE_GT=dht is not None, STORE_G0=want_dh0, IS_VARLEN=lay.is_varlen, PREC=prec)
    dq, dk = _empty(q.shape, q.dtype, q.device), _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    if lay.n_chunks * lay.H > 0:
        _bwd_dv_kernel[lay.chunk_grid(V, "BV")](
            q, k, do, g, dv, slopes, lay.cu_seqlens, lay.chunk_indices, lay.T, H=lay.H, K=K, V=V, BT=BT,
            IS_VARLEN=lay.is_varlen, PREC=prec)
        _bwd_dqk_kernel[lay.chunk_grid(K, "BK")](
            q, k, v, do, h, g, dq, dk, slopes, lay.cu_seqlens, lay.chunk_indices, lay.T, H=lay.H, K=K, V=V,
            BT=BT, IS_VARLEN=lay.is_varlen, PREC=prec)
    return dq, dk, dv, dh0


class LightningAttentionFunction(torch.autograd.Function):
    """Autograd for the chunked kernels; slopes get no gradient, the initial state does."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                initial_state: torch.Tensor | None, output_final_state: bool, lay: _Layout):
        o, ht = _forward(q, k, v, slopes, initial_state, lay, output_final_state)
        ctx.save_for_backward(q, k, v, slopes, initial_state)
        ctx.lay = lay
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do: torch.Tensor | None, dht: torch.Tensor | None):
        q, k, v, slopes, h0 = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(v)
        want_dh0 = h0 is not None and ctx.needs_input_grad[4]
        dq, dk, dv, dh0 = _backward(q, k, v, slopes, h0, do.contiguous(),
                                    dht.contiguous() if dht is not None else None, ctx.lay, want_dh0)
        return dq, dk, dv, None, dh0, None, None


def chunk_lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                              initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                              cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; slopes [H]; initial_state [N, H, K, V] (N = B, or the number
    of sequences in cu_seqlens with B = 1). Returns (o [B, T, H, V] in q's dtype, final states fp32 or None)."""
    _check_inputs(q, k, v, slopes)
    lay = _Layout(q, cu_seqlens)
    K, V = q.shape[-1], v.shape[-1]
    if initial_state is not None and initial_state.shape != (lay.n_seq, lay.H, K, V):
        raise ValueError(f"initial_state must be [N, H, K, V] = {[lay.n_seq, lay.H, K, V]}: "
                         f"got {list(initial_state.shape)}")
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    o, ht = LightningAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                             slopes.detach().float().contiguous(), h0, output_final_state, lay)
    return o, ht


def lightning_decode_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                            state: torch.Tensor) -> torch.Tensor:
    """One step for a batch of states, in place: q, k [B, H, K]; v [B, H, V]; state [B, H, K, V] fp32
    contiguous. Returns o = q (lambda S + k^T v): [B, H, V] in q's dtype."""
    if q.dim() != 3 or q.shape != k.shape or q.shape[:2] != v.shape[:2]:
        raise ValueError(f"q, k, v must be [B, H, D] with equal B, H: got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, K = q.shape
    V = v.shape[-1]
    if state.shape != (B, H, K, V) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 [B, H, K, V] = {[B, H, K, V]}: got "
                         f"{state.dtype} {list(state.shape)}, contiguous={state.is_contiguous()}")
    if max(K, V) > MAX_HEAD_DIM:
        raise ValueError(f"triton lightning decode supports head dims up to {MAX_HEAD_DIM}: got K = {K}, V = {V}")
    if slopes.shape != (H,):
        raise ValueError(f"slopes must be [H] = [{H}]: got {tuple(slopes.shape)}")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError("triton lightning decode got CPU tensors: set TRITON_INTERPRET=1 before triton is "
                           "first imported, or use backend='reference'")
    o = _empty((B, H, V), q.dtype, q.device)
    if B * H == 0:
        return o
    BK = _p2(K)
    BV = min(_p2(V), 32 if BK <= 128 else 16)  # keeps the fp32 state tile at <= 4K elements per program
    _decode_kernel[(B * H, triton.cdiv(V, BV))](
        q.contiguous(), k.contiguous(), v.contiguous(), state, o, slopes.detach().float().contiguous(),
        H=H, K=K, V=V, BK=BK, BV=BV, num_warps=4)
    return o
