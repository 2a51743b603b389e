"""MoE: routing semantics, grouped path == reference loop (forward and gradients), balance loss."""

import pytest
import torch

from xinzhou.ops import moe


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def test_softmax_router_renormalises_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w, idx, probs = moe.route(logits, 2, "softmax")
    p = torch.softmax(logits, -1)[0]
    assert idx.tolist() == [[0, 1]]
    assert w[0].tolist() == pytest.approx([(p[0] / (p[0] + p[1])).item(), (p[1] / (p[0] + p[1])).item()])
    assert probs.sum().item() == pytest.approx(1.0)


def test_sigmoid_router_bias_steers_choice_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # pushes expert 3 into the top-2
    w, idx, _ = moe.route(logits, 2, "sigmoid", bias)
    s = torch.sigmoid(logits)[0]
    chosen = sorted(zip(idx[0].tolist(), w[0].tolist()))
    assert [e for e, _ in chosen] == [0, 3]
    # weights are the chosen *unbiased* sigmoid scores, renormalised
    assert [x for _, x in chosen] == pytest.approx([(s[0] / (s[0] + s[3])).item(), (s[3] / (s[0] + s[3])).item()])


def test_balance_loss_is_k_when_uniform_and_larger_when_skewed():
    E, K, N = 4, 2, 8
    probs = torch.full((N, E), 1 / E)
    idx = torch.arange(N * K).remainder(E).view(N, K)
    assert moe.balance_loss(moe.balance_stats(probs, idx, E)).item() == pytest.approx(2.0)
    skew_p = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(N, 1)
    skew_i = torch.tensor([[0, 1]]).repeat(N, 1)
    # f = [1, 1, 0, 0] (slots per token), P = [0.7, 0.1, 0.1, 0.1] -> 4 * (0.7 + 0.1) = 3.2
    assert moe.balance_loss(moe.balance_stats(skew_p, skew_i, E)).item() == pytest.approx(3.2)
    # padding rows do not count
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    both_p, both_i = torch.cat([skew_p[:4], probs[:4]]), torch.cat([skew_i[:4], idx[:4]])
    assert moe.balance_loss(moe.balance_stats(both_p, both_i, E, mask)).item() == pytest.approx(3.2)


@pytest.mark.parametrize("C,F", [(16, 24), (10, 6)])  # grouped_mm-aligned, and the segment fallback
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_grouped_matches_loop_forward_and_backward(C, F, kind):
    E, K, N = 6, 2, 37
    g = torch.Generator().manual_seed(C + F)
    x0 = torch.randn(N, C, generator=g)
    gate = torch.randn(E, C, generator=g)
    gate[4:] = 0  # experts 4 and 5 ...
    w13_0 = torch.randn(E, 2 * F, C, generator=g) * 0.3
    w2_0 = torch.randn(E, C, F, generator=g) * 0.3
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, -100.0, -100.0])  # ... get no tokens
    results = []
    for fn in (moe.experts_loop, moe.experts_grouped):
        x, w13, w2 = (t.clone().requires_grad_() for t in (x0, w13_0, w2_0))
        logits = x @ gate.t() + (bias if kind == "softmax" else 0)
        w, idx, _ = moe.route(logits, K, kind, bias if kind == "sigmoid" else None)
        assert not (idx >= 4).any()
        y = fn(x, w13, w2, w, idx)
        y.pow(2).sum().backward()
        results.append((y, x.grad, w13.grad, w2.grad))
    for a, b in zip(*results):
        assert rel(a, b) < 1e-5
    assert results[1][2][4:].abs().max() == 0  # idle experts get zero gradient, not garbage


def test_experts_loop_is_the_swiglu_definition():
    E, C, F = 2, 4, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, C, generator=g)
    w13 = torch.randn(E, 2 * F, C, generator=g)
    w2 = torch.randn(E, C, F, generator=g)
    idx = torch.tensor([[1, 0]])
    w = torch.tensor([[0.25, 0.75]])
    y = moe.experts_loop(x, w13, w2, w, idx)

    def expert(e):
        w1, w3 = w13[e, :F], w13[e, F:]
        return w2[e] @ (torch.nn.functional.silu(w1 @ x[0]) * (w3 @ x[0]))

    assert torch.allclose(y[0], 0.25 * expert(1) + 0.75 * expert(0), atol=1e-6)


def test_grouped_path_under_autocast_computes_in_the_autocast_dtype():
    E, K, N, C, F = 4, 2, 16, 16, 24
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, generator=g)
    w13 = torch.randn(E, 2 * F, C, generator=g) * 0.3
    w2 = torch.randn(E, C, F, generator=g) * 0.3
    w, idx, _ = moe.route(torch.randn(N, E, generator=g), K, "softmax")
    ref = moe.experts_loop(x, w13, w2, w, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe.experts_grouped(x, w13, w2, w, idx)
    assert y.dtype == torch.bfloat16
    assert rel(y.float(), ref) < 3e-2  # bf16 rounding, not a different function


def test_correction_bias_update_moves_toward_even_load():
    bias = torch.zeros(4)
    moe.update_correction_bias(bias, torch.tensor([10.0, 2.0, 4.0, 0.0]), rate=0.01)
    # mean load 4: over-loaded experts go down, under-loaded up, an expert at the mean stays
    assert bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.01])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_fused_swiglu_matches_reference(dtype, tol):
    # the Triton kernel (GPU, or the CPU interpreter: tests/conftest.py) against silu(gate) * up
    g = torch.Generator().manual_seed(0)
    gu = (2 * torch.randn(37, 2 * 48, generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(37, 48, generator=g).to(dtype)
    y = moe.swiglu(gu, backend="triton")
    y_ref = moe.swiglu(gu, backend="reference")
    assert y.dtype == dtype and y.shape == (37, 48)
    d = torch.autograd.grad(y, gu, dy)[0]
    d_ref = torch.autograd.grad(y_ref, gu, dy)[0]
    for a, b in ((y, y_ref), (d, d_ref)):
        assert (a.double() - b.double()).norm() <= tol * b.double().norm()
    with pytest.raises(ValueError, match=r"\[M, 2F\]"):
        moe.swiglu(torch.randn(3, 5), backend="triton")
