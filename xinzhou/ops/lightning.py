"""Lightning attention entry point: picks a backend once per call site.

    o, final_state = lightning_attention(q, k, v, slopes, initial_state=None,
                                         output_final_state=False, cu_seqlens=None, backend="auto")
    o, _ = lightning_attention(q, k, v, slopes, segment_ids=seg)   # packed training rows [B, T]

q, k, v: [B, T, H, D]; slopes: [H] (decay per step exp(-slope)); states: [N, H, D, D] fp32 with
N = B, or N = number of sequences when `cu_seqlens` packs variable-length sequences into B = 1
(FlashAttention style: cu_seqlens = [0, len_0, len_0 + len_1, ...], int32/int64). The reference runs
packed sequences of equal length as one batch (a decode step: one batched step for all).
segment_ids [B, T] (training on packed windows): each row holds several documents, contiguous runs
of equal ids, and each is computed from a zero state as if alone (no states in or out).
backend: "reference" (pure PyTorch, ops/lightning_ref.py), "triton" (ops/lightning_triton.py; on CPU
tensors only under TRITON_INTERPRET=1) or "auto" (triton for CUDA tensors when triton imports and
XINZHOU_TRITON is not 0, else reference). Triton is imported on first use, so CPU-only callers never load it.
"""

from __future__ import annotations

from types import ModuleType

import torch

from xinzhou.ops import pick_triton
from xinzhou.ops.lightning_ref import check_cu_seqlens, lightning_blockwise, lightning_segmented, lightning_step

REFERENCE_BLOCK = 256


def _triton_backend(q: torch.Tensor, backend: str) -> ModuleType | None:
    """The Triton module when this call should use it, else None (reference); its kernels are
    torch.library ops, so it stays in use under torch.compile."""
    return pick_triton(q, backend, "lightning_triton", under_compile=True)


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                        initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                        cu_seqlens: torch.Tensor | None = None, backend: str = "auto",
                        block_size: int = REFERENCE_BLOCK, segment_ids: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """block_size only shapes the reference computation (every block size gives the same result)."""
    module = _triton_backend(q, backend)
    if segment_ids is not None:
        if initial_state is not None or output_final_state or cu_seqlens is not None:
            raise ValueError("segment_ids (packed training rows) take no states and no cu_seqlens")
        if module is None:
            return lightning_segmented(q, k, v, slopes, segment_ids, block_size), None
        B, T = segment_ids.shape  # the documents of all rows as packed sequences of one row
        cu = torch.cat([segment_starts(segment_ids).reshape(-1).nonzero()[:, 0],
                        torch.tensor([B * T], device=q.device)])
        o, _ = module.chunk_lightning_attention(*(x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v)), slopes,
                                                None, False, cu)
        return o.view(q.shape[:3] + v.shape[-1:]), None
    if module is not None:  # validates cu_seqlens itself, with one host sync
        return module.chunk_lightning_attention(q, k, v, slopes, initial_state, output_final_state, cu_seqlens)
    if cu_seqlens is None:
        o, state = lightning_blockwise(q, k, v, slopes, initial_state, block_size)
        return o, (state if output_final_state else None)
    bounds = check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
    n = len(bounds) - 1
    if initial_state is not None and initial_state.shape[0] != n:
        raise ValueError(f"initial_state has {initial_state.shape[0]} states for {n} sequences")
    return _varlen_reference(q, k, v, slopes, initial_state, output_final_state, bounds, block_size)


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True where a document starts (each row's first token, and where the id changes)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def _varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                      initial_state: torch.Tensor | None, output_final_state: bool, bounds: list[int],
                      block_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Packed sequences, grouped by length: sequences of equal length run as one batch (a decode
    step of N sequences is one batched `lightning_step`, not N calls)."""
    _, T, H, D = q.shape
    Dv = v.shape[-1]
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    o = q.new_zeros(T, H, Dv) if len(groups) > 1 else None
    states = (initial_state.float().clone() if initial_state is not None
              else q.new_zeros(len(lengths), H, D, Dv, dtype=torch.float32))
    for n, seqs in groups.items():
        if n == 0:  # an empty sequence keeps its initial state
            continue
        if len(groups) == 1:  # every sequence has n tokens (a decode step): the packed rows as they are
            rows = None
            qg, kg, vg = (x[0].view(len(seqs), n, H, -1) for x in (q, k, v))
        else:
            starts = torch.tensor([bounds[i] for i in seqs], device=q.device)
            rows = (starts[:, None] + torch.arange(n, device=q.device)).reshape(-1)  # [G * n]
            qg, kg, vg = (x[0, rows].view(len(seqs), n, H, -1) for x in (q, k, v))  # [G, n, H, D]
        s0 = initial_state[seqs] if initial_state is not None else None
        if n == 1:
            if s0 is None:
                s0 = q.new_zeros(len(seqs), H, D, Dv, dtype=torch.float32)
            og, sg = lightning_step(qg[:, 0], kg[:, 0], vg[:, 0], slopes, s0)
            og = og[:, None]
        else:
            og, sg = lightning_blockwise(qg, kg, vg, slopes, s0, block_size)
        if o is None:  # one group: the packed order is the group's order
            o = og.reshape(T, H, Dv)
        else:
            o = o.index_put((rows,), og.reshape(-1, H, Dv))
        if output_final_state:
            states = sg if rows is None else states.index_put((torch.tensor(seqs, device=q.device),), sg)
    if o is None:  # no tokens at all
        o = q.new_zeros(T, H, Dv)
    return o[None], (states if output_final_state else None)


def lightning_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                     state: torch.Tensor, slots: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Advance a batch of states by one token, in place: q, k, v [B, H, D]; state [B, H, D, D] fp32,
    or with `slots` ([B] distinct ints) a pool [S, H, D, D] whose row slots[b] is sequence b's
    state (the engine's cache). Rows that share a slot leave it holding one of their results (which
    one is undefined): only for rows whose results are thrown away (engine/graphs.py's padding).
    Returns o [B, H, D]."""
    module = _triton_backend(q, backend)
    if module is not None:
        return module.lightning_decode_triton(q, k, v, slopes, state, slots)
    if slots is None:
        o, new_state = lightning_step(q, k, v, slopes, state)
        state.copy_(new_state)
        return o
    o, new_state = lightning_step(q, k, v, slopes, state[slots])
    state.index_copy_(0, slots, new_state)
    return o
