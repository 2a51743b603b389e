"""Decode steps at fixed shapes, replayed from CUDA graphs.

A decode step (one new token for each of n running requests) launches a few hundred small kernels,
and at small batches on a GPU their launch time, not their work, sets the speed. Here the step runs
at fixed shapes instead: n is padded up to a batch bucket (powers of two up to the engine's
max_batch, and max_batch itself), the keys each row reads up to a length bucket (powers of two, at
least 16), and each (batch, length) shape is captured once as a CUDA graph, on its first use, then
replayed: the step's inputs are copied into the graph's static buffers, one replay runs every
kernel, and the logits are copied out.

Padding rows write their key and value to a scratch page and step a scratch lightning state,
both held by a scratch slot that no request uses (the engine acquires it), and attend only to
that scratch row; their logits are dropped. A real row attends to its own keys only (the padded
ones are masked out), so its logits are the eager step's up to float rounding, and its greedy
tokens the same (tests/test_scheduler.py). The scratch state is zeroed at the start of every
step, so padding never accumulates anything.

A captured graph keeps the addresses of the cache's tensors, so the page pool must be fixed in
size (the engine's is). Capture needs a step with no host synchronisation: on CUDA that is a bf16
model whose MoE runs torch's grouped GEMM (its fallback loops over experts on the host). Shapes
are captured when first met, so a new batch or length bucket costs one capture (two eager warm-up
steps and the capture) in the step that meets it.
Without capture (on a CPU, or capture=False) the same fixed-shape step runs eagerly: no faster,
and what the tests check on machines without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xinzhou.cache import HybridCache, Packing
from xinzhou.model import XinzhouLM
from xinzhou.ops import moe as moe_ops


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... below max_batch, then max_batch."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


@dataclass
class _Shape:
    """One (batch, keys) shape: its static inputs (a Packing whose tensors are the buffers), its
    graph once captured, and the graph's output."""
    ids: torch.Tensor  # [1, N]
    packing: Packing
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [N, V], written by every replay


class DecodeGraphs:
    """Fixed-shape decode steps for `model` over `cache`, whose slot `scratch_slot` (acquired, never
    used by a request, holding at least one page when the model has softmax layers) takes the
    padding rows. capture: None = on CUDA only."""

    def __init__(self, model: XinzhouLM, cache: HybridCache, scratch_slot: int, max_batch: int,
                 capture: bool | None = None) -> None:
        self.model, self.cache, self.scratch = model, cache, scratch_slot
        on_cuda = cache.device.type == "cuda"
        self.capture = on_cuda if capture is None else capture
        if self.capture and not on_cuda:
            raise ValueError(f"CUDA graphs need a model on a CUDA device: the cache is on {cache.device}")
        dtype = next(model.parameters()).dtype
        if self.capture and dtype != torch.bfloat16:
            raise ValueError(f"CUDA graphs need a bf16 model: got {dtype} (the MoE's fp32 path loops over "
                             f"experts on the host, which a graph cannot capture)")
        if self.capture:  # the grouped GEMM (no host sync) wants 16-byte aligned rows, as it gets them in a step
            cfg = model.config
            rows = torch.empty(1, cfg.hidden_size, dtype=dtype, device=cache.device)
            hidden = torch.empty(1, cfg.expert_dim, dtype=dtype, device=cache.device)
            if not all(moe_ops._grouped_mm_ok(rows, b.moe.w13.transpose(1, 2))
                       and moe_ops._grouped_mm_ok(hidden, b.moe.w2.transpose(1, 2)) for b in model.layers):
                raise ValueError(f"CUDA graphs need the MoE's grouped GEMM (torch.nn.functional.grouped_mm, and "
                                 f"hidden_size = {cfg.hidden_size} and expert_dim = {cfg.expert_dim} multiples of 8): "
                                 f"its fallback loops over experts on the host")
        if cache.growable:
            raise ValueError("fixed-shape decode needs a cache with a fixed page pool (num_pages=...): a pool "
                             "that grows moves its tensors, and a captured graph keeps their addresses")
        if cache.kv_layers and not cache.pages[scratch_slot]:
            raise ValueError(f"scratch slot {scratch_slot} holds no KV page: reserve one for the padding rows")
        self.buckets = batch_buckets(max_batch)
        self.scratch_row = cache.pages[scratch_slot][0] * cache.page_size if cache.kv_layers else 0
        self.max_keys = cache.num_pages * cache.page_size
        self.shapes: dict[tuple[int, int], _Shape] = {}
        self._pool = None  # one CUDA memory pool for every graph (they never run at once)

    def shape_for(self, n: int, keys: int) -> tuple[int, int]:
        """The (batch, keys) bucket of a step of n rows whose longest row reads `keys` keys."""
        if n > self.buckets[-1]:
            raise ValueError(f"a decode step of {n} rows: more than max_batch = {self.buckets[-1]}")
        batch = next(b for b in self.buckets if b >= n)
        if not self.cache.kv_layers:  # no layer reads keys: one shape per batch
            return batch, 1
        width = 16
        while width < keys:
            width *= 2
        return batch, max(min(width, self.max_keys), keys)

    @torch.no_grad()
    def step(self, tokens: list[int], slots: list[int]) -> torch.Tensor:
        """One decode step: tokens[i] is written to slots[i]; returns the next-token logits [n, V]
        (fp32), as model(ids, cu_seqlens=..., cache=..., slots=slots, last_logits_only=True)[0]."""
        n = len(tokens)
        packing = self.cache.begin(slots, [1] * n)  # reserves pages; the rows and mask of the real rows
        keys = packing.keys
        key = self.shape_for(n, keys)
        shape = self.shapes.get(key)
        if shape is None:
            shape = self.shapes[key] = self._new_shape(*key)
        self._load(shape, tokens, slots, packing)
        if shape.graph is not None:
            shape.graph.replay()
            logits = shape.logits
        else:
            logits = self._forward(shape)
        self.cache.end(packing)
        return logits[:n].clone()

    def _new_shape(self, batch: int, keys: int) -> _Shape:
        dev = self.cache.device
        arange = torch.arange(batch, device=dev)
        packing = Packing(
            seqlens=[1] * batch, starts=[0] * batch,
            cu_seqlens=torch.arange(batch + 1, dtype=torch.int32, device=dev),
            position_ids=torch.empty(1, batch, dtype=torch.long, device=dev),
            last_index=arange, q_index=arange[:, None].clone(), unpad_index=arange.clone(),
            _mask=torch.empty(batch, 1, 1, keys, dtype=torch.bool, device=dev),
            cache=self.cache, slots=[self.scratch] * batch,
            write_rows=torch.empty(batch, dtype=torch.long, device=dev),
            read_rows=torch.empty(batch, keys, dtype=torch.long, device=dev),
            _slot_index=torch.empty(batch, dtype=torch.long, device=dev))
        shape = _Shape(ids=torch.empty(1, batch, dtype=torch.long, device=dev), packing=packing)
        self._pad(shape, 0)  # every row padding: warm-up and capture touch the scratch slot only
        if self.capture:
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # compiles the kernels and builds cached tensors outside the capture
                for _ in range(2):
                    self._forward(shape)
            torch.cuda.current_stream(dev).wait_stream(side)
            shape.graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (a server's) do not invalidate the capture
            with torch.cuda.graph(shape.graph, pool=self._pool, capture_error_mode="thread_local"):
                shape.logits = self._forward(shape)
            self._pool = shape.graph.pool()
        return shape

    def _load(self, shape: _Shape, tokens: list[int], slots: list[int], packing: Packing) -> None:
        """Copy the step's inputs into the shape's buffers: real rows first, padding after."""
        p, n, keys = shape.packing, len(tokens), packing.keys
        dev = self.cache.device
        shape.ids[0, :n] = torch.tensor(tokens, dtype=torch.long, device=dev)
        p.position_ids[0, :n] = packing.position_ids[0]
        p._slot_index[:n] = torch.tensor(slots, dtype=torch.long, device=dev)
        if self.cache.kv_layers:
            p.write_rows[:n] = packing.write_rows
            p.read_rows[:n, :keys] = packing.read_rows
            p.read_rows[:n, keys:] = packing.read_rows[:, :1]  # masked out; a row's own key, not the scratch one
            p.mask[:n] = False
            p.mask[:n, :, :, :keys] = packing.mask
        self._pad(shape, n)

    def _pad(self, shape: _Shape, n: int) -> None:
        """Rows n.. of the buffers as padding: token 0 at position 0, the scratch slot's state, the
        scratch row as the one key written and read."""
        p = shape.packing
        shape.ids[0, n:] = 0
        p.position_ids[0, n:] = 0
        p._slot_index[n:] = self.scratch
        p.write_rows[n:] = self.scratch_row
        p.read_rows[n:] = self.scratch_row
        p.mask[n:] = False
        p.mask[n:, :, :, 0] = True

    def _forward(self, shape: _Shape) -> torch.Tensor:
        """The step on the shape's buffers -> logits [N, V] fp32 (what a capture records)."""
        for layer in self.cache.lightning_layers:
            self.cache.state[layer][self.scratch].zero_()
        p = shape.packing
        x, _ = self.model.hidden_states(shape.ids, p.position_ids, None, None, p)
        return self.model.head(x)[0].float()
