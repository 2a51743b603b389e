"""Triton lightning attention (ops/lightning_triton.py) against the pure-PyTorch definition.

Runs on the GPU when there is one, else on the CPU under TRITON_INTERPRET=1 (small shapes: the
interpreter is slow). Every buffer the kernels fill is NaN-poisoned, so a missed write shows up.
    python -m pytest tests/test_lightning_triton.py -q
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

from xinzhou.ops import lightning_triton  # noqa: E402
from xinzhou.ops.lightning import lightning_attention, lightning_decode  # noqa: E402
from xinzhou.ops.lightning_ref import lightning_blockwise, lightning_naive, lightning_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5
BF16_TOL = 2e-2


@pytest.fixture(autouse=True)
def nan_poisoned_buffers(monkeypatch):
    def empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(lightning_triton, "_empty", empty)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def slopes_for(H: int) -> torch.Tensor:
    # MiniMax's ALiBi slopes span fast (0.5) to slow decay; the last one stresses lambda ~ 1
    s = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)])
    s[-1] = 1e-4
    return s.to(DEVICE)


def inputs(B: int, T: int, H: int, K: int, V: int, dtype=torch.float32, state: bool = True, N: int | None = None):
    q, k, v = (torch.randn(B, T, H, d, device=DEVICE).to(dtype).requires_grad_() for d in (K, K, V))
    s0 = torch.randn(N or B, H, K, V, device=DEVICE, requires_grad=True) if state else None
    return q, k, v, s0


def run_with_grads(fn, q, k, v, s0, do, dst):
    """Outputs, final state and gradients of <o, do> + <state, dst> for q, k, v (and s0)."""
    o, st = fn()
    loss = (o.float() * do).sum() + (st * dst).sum()
    leaves = [q, k, v] + ([s0] if s0 is not None else [])
    return o, st, torch.autograd.grad(loss, leaves)


@pytest.fixture(params=[None, 64, 128], ids=["whole", "seg64", "seg128"])
def segment(request, monkeypatch):
    """Segment length of the kernels: whole sequences (what these small shapes get by default), or
    sequences cut into segments of 64 / 128 tokens that start from the sums of the ones before."""
    monkeypatch.setattr(lightning_triton, "SEGMENT_LEN", request.param)
    return request.param


@pytest.mark.parametrize("T", [1, 63, 100, 257])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_reference_fp32(T, with_state, segment):
    B, H, K, V = 2, 2, 32, 48
    q, k, v, s0 = inputs(B, T, H, K, V, state=with_state)
    slopes = slopes_for(H)
    do, dst = torch.randn(B, T, H, V, device=DEVICE), torch.randn(B, H, K, V, device=DEVICE)
    out = run_with_grads(lambda: lightning_attention(q, k, v, slopes, s0, True, backend="triton"), q, k, v, s0, do, dst)
    for ref_fn in (lambda: lightning_naive(q, k, v, slopes, s0),
                   lambda: lightning_attention(q, k, v, slopes, s0, True, backend="reference", block_size=32)):
        ref = run_with_grads(ref_fn, q, k, v, s0, do, dst)
        assert rel_err(out[0], ref[0]) < FP32_TOL
        assert rel_err(out[1], ref[1]) < FP32_TOL
        assert out[1].dtype == torch.float32
        for name, g, g_ref in zip(("dq", "dk", "dv", "ds0"), out[2], ref[2]):
            assert rel_err(g, g_ref) < FP32_TOL, name


def test_output_only_and_final_state_only_gradients(segment):
    B, T, H, K = 3, 100, 2, 32  # B = 3: sequence 2 finds its chunk rows by multiplying, not adding
    q, k, v, s0 = inputs(B, T, H, K, K)
    slopes = slopes_for(H)
    o, st = lightning_attention(q, k, v, slopes, s0, output_final_state=False, backend="triton")
    assert st is None
    o_ref, st_ref = lightning_naive(q, k, v, slopes, s0)
    g = torch.autograd.grad(o.sum(), (q, k, v, s0))
    g_ref = torch.autograd.grad(o_ref.sum(), (q, k, v, s0))
    assert all(rel_err(a, b) < FP32_TOL for a, b in zip(g, g_ref))
    _, st = lightning_attention(q, k, v, slopes, s0, output_final_state=True, backend="triton")
    g = torch.autograd.grad(st.sum(), (k, v, s0))
    g_ref = torch.autograd.grad(st_ref.sum(), (k, v, s0))
    assert all(rel_err(a, b) < FP32_TOL for a, b in zip(g, g_ref))


@pytest.mark.parametrize("K,V", [(40, 24), (128, 128)])
def test_head_dims(K, V):
    B, T, H = 1, 70, 1
    q, k, v, s0 = inputs(B, T, H, K, V)
    slopes = torch.tensor([0.1], device=DEVICE)
    do, dst = torch.randn(B, T, H, V, device=DEVICE), torch.randn(B, H, K, V, device=DEVICE)
    out = run_with_grads(lambda: lightning_attention(q, k, v, slopes, s0, True, backend="triton"), q, k, v, s0, do, dst)
    ref = run_with_grads(lambda: lightning_naive(q, k, v, slopes, s0), q, k, v, s0, do, dst)
    for x, x_ref in zip((out[0], out[1], *out[2]), (ref[0], ref[1], *ref[2])):
        assert rel_err(x, x_ref) < FP32_TOL


def test_varlen_matches_separate_sequences(segment):
    lens = [1, 63, 0, 100, 257]
    H, K, V = 2, 32, 32
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEVICE, dtype=torch.int32)
    T = int(cu[-1])
    q, k, v, s0 = inputs(1, T, H, K, V, N=len(lens))
    slopes = slopes_for(H)
    do, dst = torch.randn(1, T, H, V, device=DEVICE), torch.randn(len(lens), H, K, V, device=DEVICE)
    out = run_with_grads(lambda: lightning_attention(q, k, v, slopes, s0, True, cu_seqlens=cu, backend="triton"),
                         q, k, v, s0, do, dst)

    def separately():
        outs, states = [], []
        for i, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
            o, s = lightning_blockwise(q[:, a:b], k[:, a:b], v[:, a:b], slopes, s0[i:i + 1], block_size=64)
            outs.append(o)
            states.append(s)
        return torch.cat(outs, 1), torch.cat(states)

    for ref_fn in (separately,
                   lambda: lightning_attention(q, k, v, slopes, s0, True, cu_seqlens=cu, backend="reference")):
        ref = run_with_grads(ref_fn, q, k, v, s0, do, dst)
        for x, x_ref in zip((out[0], out[1], *out[2]), (ref[0], ref[1], *ref[2])):
            assert rel_err(x, x_ref) < FP32_TOL
    # the empty sequence passes its state through, and its state gradient is the final one's
    assert torch.equal(out[1][2], s0[2].detach())
    assert torch.equal(out[2][3][2], dst[2])


def test_varlen_without_initial_state():
    lens = [5, 64, 65]
    H, K = 2, 16
    cu = torch.tensor([0, 5, 69, 134], device=DEVICE, dtype=torch.int64)
    q, k, v, _ = inputs(1, sum(lens), H, K, K, state=False)
    slopes = slopes_for(H)
    o, st = lightning_attention(q, k, v, slopes, None, True, cu_seqlens=cu, backend="triton")
    o_ref, st_ref = lightning_attention(q, k, v, slopes, None, True, cu_seqlens=cu, backend="reference")
    assert rel_err(o, o_ref) < FP32_TOL and rel_err(st, st_ref) < FP32_TOL


def test_float16_large_state_stays_finite():
    # a slowly decaying head accumulates a state past float16's 65504 (1600 per token and entry) while
    # the outputs stay within it (about 2500 at the end): computed in bf16, nothing overflows
    B, T, H, K = 1, 96, 1, 16
    q = torch.full((B, T, H, K), 1e-3, device=DEVICE, dtype=torch.float16)
    k = v = torch.full((B, T, H, K), 40.0, device=DEVICE, dtype=torch.float16)
    slopes = torch.tensor([1e-4], device=DEVICE)
    o, st = lightning_attention(q, k, v, slopes, output_final_state=True, backend="triton")
    o_ref, st_ref = lightning_naive(q.float(), k.float(), v.float(), slopes)
    assert o.dtype == torch.float16 and bool(torch.isfinite(o).all())
    assert rel_err(o, o_ref) < BF16_TOL and rel_err(st, st_ref) < BF16_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype, segment):
    B, T, H, K = 1, 100, 2, 64
    q, k, v, s0 = inputs(B, T, H, K, K, dtype=dtype)
    slopes = slopes_for(H)
    do, dst = torch.randn(B, T, H, K, device=DEVICE), torch.randn(B, H, K, K, device=DEVICE)
    out = run_with_grads(lambda: lightning_attention(q, k, v, slopes, s0, True, backend="triton"), q, k, v, s0, do, dst)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    assert all(g.dtype == dtype for g in out[2][:3]) and out[2][3].dtype == torch.float32
    # the reference computes in fp32 from the same rounded inputs
    ref = run_with_grads(lambda: lightning_naive(q, k, v, slopes, s0), q, k, v, s0, do, dst)
    for x, x_ref in zip((out[0], out[1], *out[2]), (ref[0], ref[1], *ref[2])):
        assert rel_err(x, x_ref) < BF16_TOL


def test_initial_state_only_gradient(segment):
    # no gradient for q, k, v: the forward keeps no segment start states, the backward recomputes them
    B, T, H, K = 1, 200, 2, 32
    q, k, v, s0 = inputs(B, T, H, K, K)
    q, k, v = q.detach(), k.detach(), v.detach()
    slopes = slopes_for(H)
    o, st = lightning_attention(q, k, v, slopes, s0, True, backend="triton")
    g = torch.autograd.grad(o.sum() + st.sum(), s0)[0]
    o_ref, st_ref = lightning_naive(q, k, v, slopes, s0)
    g_ref = torch.autograd.grad(o_ref.sum() + st_ref.sum(), s0)[0]
    assert rel_err(g, g_ref) < FP32_TOL


def test_segment_lengths_fill_the_gpu(monkeypatch):
    seg = lightning_triton._segment_len
    monkeypatch.setattr(lightning_triton, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    # B=1, H=16, D=128: 32 programs a segment (64-wide V blocks), one program per SM: 4 segments
    assert seg(1, 8192, 8192, 16, 128, cuda) == 2048
    assert seg(1, 131072, 131072, 16, 128, cuda) == 32768
    assert seg(2, 2 * 8192, 8192, 16, 128, cuda) == 4096  # 2 sequences x 2 segments
    # short sequences never get segments below MIN_SEGMENT, nor longer than the sequence
    assert seg(1, 512, 512, 16, 128, cuda) == 256
    assert seg(1, 100, 100, 16, 128, cuda) == 128
    # B=4, H=32: 256 programs from whole sequences, already more than the SMs
    assert seg(4, 4 * 8192, 8192, 32, 128, cuda) == 8192
    # the `small` preset's lightning layers (H=16, D=64) at (1, 8192): 16 programs a segment, 8 segments
    assert seg(1, 8192, 8192, 16, 64, cuda) == 1024
    monkeypatch.setattr(lightning_triton, "SEGMENT_LEN", 100)
    with pytest.raises(ValueError, match="multiple of 64"):
        seg(1, 8192, 8192, 16, 128, cuda)


@pytest.mark.parametrize("case", ["state", "no_state", "varlen"])
def test_op_registration_passes_opcheck(case):
    # schema, fake (shape-only) implementation, autograd registration and AOT dispatch of the op
    H, K, V = 2, 16, 24
    if case == "varlen":
        cu = torch.tensor([0, 5, 70, 70], dtype=torch.int32, device=DEVICE)
        q, k, v, s0 = inputs(1, 70, H, K, V, N=3)
    else:
        cu = None
        q, k, v, s0 = inputs(2, 70, H, K, V, state=case == "state")
    args = (q, k, v, slopes_for(H), s0, cu, case != "no_state")
    torch.library.opcheck(torch.ops.xinzhou.lightning_forward.default, args)


def test_torch_compile_keeps_the_op_in_one_graph():
    B, T, H, K = 2, 70, 2, 16
    q, k, v, s0 = inputs(B, T, H, K, K)
    slopes = slopes_for(H)

    def f(q, k, v, s0):
        o, st = lightning_attention(q, k, v, slopes, s0, True, backend="triton")
        return (o.float() ** 2).sum() + st.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
    loss, loss_ref = compiled(q, k, v, s0), f(q, k, v, s0)
    grads = torch.autograd.grad(loss, (q, k, v, s0))
    grads_ref = torch.autograd.grad(loss_ref, (q, k, v, s0))
    assert rel_err(loss, loss_ref) < FP32_TOL
    assert all(rel_err(g, r) < FP32_TOL for g, r in zip(grads, grads_ref))


@pytest.mark.parametrize("K,V", [(32, 32), (40, 24)])
def test_decode_matches_step(K, V):
    B, H = 3, 2
    slopes = slopes_for(H)
    state = torch.randn(B, H, K, V, device=DEVICE)
    ref_state = state.clone()
    for _ in range(3):
        q, k = torch.randn(B, H, K, device=DEVICE), torch.randn(B, H, K, device=DEVICE)
        v = torch.randn(B, H, V, device=DEVICE)
        o = lightning_decode(q, k, v, slopes, state, backend="triton")
        o_ref, ref_state = lightning_step(q, k, v, slopes, ref_state)
        assert rel_err(o, o_ref) < FP32_TOL
        assert rel_err(state, ref_state) < FP32_TOL


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_decode_steps_pool_rows_in_place(backend):
    """With slots, sequence b steps row slots[b] of a state pool (the engine's cache); the other
    rows are untouched."""
    S, H, K, V = 6, 2, 32, 24
    slots = torch.tensor([4, 0, 2], device=DEVICE)
    pool = torch.randn(S, H, K, V, device=DEVICE)
    before = pool.clone()
    q, k = torch.randn(3, H, K, device=DEVICE), torch.randn(3, H, K, device=DEVICE)
    v = torch.randn(3, H, V, device=DEVICE)
    o = lightning_decode(q, k, v, slopes_for(H), pool, slots=slots, backend=backend)
    o_ref, st_ref = lightning_step(q, k, v, slopes_for(H), before[slots])
    assert rel_err(o, o_ref) < FP32_TOL and rel_err(pool[slots], st_ref) < FP32_TOL
    assert torch.equal(pool[[1, 3, 5]], before[[1, 3, 5]])
    if backend == "triton":
        torch.library.opcheck(torch.ops.xinzhou.lightning_decode.default,
                              (q, k, v, slopes_for(H), pool.clone(), slots))
        with pytest.raises(ValueError, match="slots must be"):
            lightning_decode(q, k, v, slopes_for(H), pool, slots=slots[:2], backend=backend)


def test_decode_op_passes_opcheck():
    B, H, K, V = 2, 2, 16, 24
    q, k, v = torch.randn(B, H, K, device=DEVICE), torch.randn(B, H, K, device=DEVICE), torch.randn(B, H, V, device=DEVICE)
    state = torch.randn(B, H, K, V, device=DEVICE)
    torch.library.opcheck(torch.ops.xinzhou.lightning_decode.default, (q, k, v, slopes_for(H), state))


def test_decode_continues_prefill_bf16():
    B, T, H, K = 2, 63, 2, 32
    q, k, v, _ = inputs(B, T + 1, H, K, K, dtype=torch.bfloat16, state=False)
    slopes = slopes_for(H)
    with torch.no_grad():
        _, state = lightning_attention(q[:, :T], k[:, :T], v[:, :T], slopes, output_final_state=True, backend="triton")
        o = lightning_decode(q[:, T], k[:, T], v[:, T], slopes, state, backend="triton")
        o_ref, st_ref = lightning_naive(q, k, v, slopes)
    assert o.dtype == torch.bfloat16
    assert rel_err(o, o_ref[:, T]) < BF16_TOL
    assert rel_err(state, st_ref) < BF16_TOL


def test_errors_name_the_problem():
    q = torch.randn(1, 4, 1, 512, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 256"):
        lightning_attention(q, q, q, torch.ones(1, device=DEVICE), backend="triton")
    q = torch.randn(2, 4, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="batch 1"):
        lightning_attention(q, q, q, torch.ones(1, device=DEVICE), cu_seqlens=torch.tensor([0, 4]), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        lightning_attention(q, q, q, torch.ones(1, device=DEVICE), backend="cuda")
    state = torch.zeros(2, 1, 16, 16, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        lightning_decode(q[:, 0], q[:, 0], q[:, 0], torch.ones(1, device=DEVICE), state, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks the GPU kernels at a real shape")
def test_gpu_long_sequence_bf16():
    # B*H = 8 is too few programs for the SMs: the sequences are cut into segments (the default choice)
    B, T, H, K = 2, 4099, 4, 128
    q, k, v, s0 = inputs(B, T, H, K, K, dtype=torch.bfloat16)
    with torch.no_grad():
        for x in (q, k, v):
            x.mul_(0.1)
    slopes = slopes_for(H)
    do, dst = torch.randn(B, T, H, K, device=DEVICE), torch.randn(B, H, K, K, device=DEVICE)
    out = run_with_grads(lambda: lightning_attention(q, k, v, slopes, s0, True, backend="triton"), q, k, v, s0, do, dst)
    ref = run_with_grads(lambda: lightning_blockwise(q.float(), k.float(), v.float(), slopes, s0), q, k, v, s0, do, dst)
    for name, x, x_ref in zip(("o", "state", "dq", "dk", "dv", "ds0"), (out[0], out[1], *out[2]), (ref[0], ref[1], *ref[2])):
        assert rel_err(x, x_ref) < BF16_TOL, name


def test_segment_ids_run_as_packed_sequences(segment):
    # training rows of several documents go to the varlen kernel as one packed row
    H, K = 2, 16
    seg = torch.tensor([[0] * 5 + [1] * 70 + [2] * 25, [3] * 100], device=DEVICE)
    q, k, v, _ = inputs(2, 100, H, K, K, state=False)
    slopes = slopes_for(H)
    do = torch.randn(2, 100, H, K, device=DEVICE)

    def run(backend):
        o, state = lightning_attention(q, k, v, slopes, segment_ids=seg, backend=backend, block_size=64)
        assert state is None
        return o, *torch.autograd.grad((o.float() * do).sum(), (q, k, v))

    for x, x_ref in zip(run("triton"), run("reference")):
        assert rel_err(x, x_ref) < FP32_TOL
