"""The three forms of lightning attention agree: outputs, final states and gradients."""

import pytest
import torch

from xinzhou.ops import lightning_ref
from xinzhou.ops.lightning import lightning_attention, lightning_decode
from xinzhou.ops.lightning_ref import lightning_blockwise, lightning_naive, lightning_recurrent, lightning_step


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def inputs(B: int, T: int, H: int, D: int, seed: int, with_state: bool):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)]) * 0.7
    s0 = torch.randn(B, H, D, D, generator=g) if with_state else None
    return q, k, v, slopes, s0


def test_decay_definition_by_hand():
    # T=2, one head, D=1: o_1 = l^2 q1 s0 + l q1 k0 v0 + q1 k1 v1, S = l^2 s0 + l k0 v0 + k1 v1
    q = torch.tensor([2.0, 3.0]).view(1, 2, 1, 1)
    k = torch.tensor([5.0, 7.0]).view(1, 2, 1, 1)
    v = torch.tensor([11.0, 13.0]).view(1, 2, 1, 1)
    s = torch.tensor([0.5])
    lam = torch.exp(-s).item()
    s0 = torch.tensor([[[[0.25]]]])
    for fn in (lightning_naive, lightning_recurrent, lambda *a: lightning_blockwise(*a, block_size=1)):
        o, S = fn(q, k, v, s, s0)
        assert o[0, 0, 0, 0].item() == pytest.approx(lam * 2 * 0.25 + 2 * 5 * 11, rel=1e-6)
        assert o[0, 1, 0, 0].item() == pytest.approx(lam**2 * 3 * 0.25 + lam * 3 * 5 * 11 + 3 * 7 * 13, rel=1e-6)
        assert S.item() == pytest.approx(lam**2 * 0.25 + lam * 5 * 11 + 7 * 13, rel=1e-6)


@pytest.fixture(params=["one span", 700, 3000])
def span_budget(request, monkeypatch):
    """The block form batches as many blocks as fit a budget and carries the state between spans:
    both regimes must give the definition's result."""
    if request.param != "one span":  # 700: one block per span; 3000: spans of several blocks here
        monkeypatch.setattr(lightning_ref, "SPAN_ELEMENTS", request.param)
    return request.param


@pytest.mark.parametrize("T", [1, 63, 100, 257])
@pytest.mark.parametrize("with_state", [False, True])
def test_forms_agree_forward(T, with_state, span_budget):
    q, k, v, slopes, s0 = inputs(2, T, 3, 8, seed=T, with_state=with_state)
    o_n, s_n = lightning_naive(q, k, v, slopes, s0)
    for block in (1, 16, 64, 256):  # block sizes that do and do not divide T
        o_b, s_b = lightning_blockwise(q, k, v, slopes, s0, block_size=block)
        assert rel(o_b, o_n) < 1e-5 and rel(s_b, s_n) < 1e-5
    o_r, s_r = lightning_recurrent(q, k, v, slopes, s0)
    assert rel(o_r, o_n) < 1e-5 and rel(s_r, s_n) < 1e-5


@pytest.mark.parametrize("T", [1, 63, 100, 257])
def test_forms_agree_gradients(T, span_budget):
    q, k, v, slopes, s0 = inputs(1, T, 2, 8, seed=100 + T, with_state=True)
    g = torch.Generator().manual_seed(7)
    do = torch.randn(1, T, 2, 8, generator=g)
    ds = torch.randn(1, 2, 8, 8, generator=g)
    grads = []
    for fn in (lightning_naive, lambda *a: lightning_blockwise(*a, block_size=16), lightning_recurrent):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, s0)]
        o, s = fn(*leaves[:3], slopes, leaves[3])
        ((o * do).sum() + (s * ds).sum()).backward()
        grads.append([t.grad for t in leaves])
    for other in grads[1:]:
        for a, b in zip(other, grads[0]):
            assert rel(a, b) < 1e-5


def test_step_and_decode_entry_point():
    q, k, v, slopes, s0 = inputs(3, 1, 4, 8, seed=3, with_state=True)
    o_ref, s_ref = lightning_naive(q, k, v, slopes, s0)
    o, s = lightning_step(q[:, 0], k[:, 0], v[:, 0], slopes, s0)
    assert rel(o, o_ref[:, 0]) < 1e-6 and rel(s, s_ref) < 1e-6
    state = s0.clone()
    o2 = lightning_decode(q[:, 0], k[:, 0], v[:, 0], slopes, state, backend="reference")
    assert rel(o2, o_ref[:, 0]) < 1e-6 and rel(state, s_ref) < 1e-6  # advanced in place


def test_varlen_matches_separate_sequences():
    lens = [5, 1, 40, 17]
    H, D = 2, 8
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, sum(lens), H, D, generator=g) for _ in range(3))
    slopes = torch.tensor([0.3, 0.05])
    s0 = torch.randn(len(lens), H, D, D, generator=g)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    o, s = lightning_attention(q, k, v, slopes, s0, output_final_state=True, cu_seqlens=cu, backend="reference")
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_i, s_i = lightning_naive(q[:, a:b], k[:, a:b], v[:, a:b], slopes, s0[i:i + 1])
        assert rel(o[:, a:b], o_i) < 1e-5 and rel(s[i:i + 1], s_i) < 1e-5


def test_bad_inputs_are_named():
    q, k, v, slopes, _ = inputs(1, 4, 2, 8, seed=0, with_state=False)
    with pytest.raises(ValueError, match="slopes"):
        lightning_naive(q, k, v, slopes[:1])
    with pytest.raises(ValueError, match="state"):
        lightning_blockwise(q, k, v, slopes, torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        lightning_attention(q, k, v, slopes, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="backend"):
        lightning_attention(q, k, v, slopes, backend="cuda-magic")


@pytest.mark.parametrize("with_state", [False, True])
def test_varlen_groups_equal_lengths_exactly(with_state):
    # equal lengths run as one batch (a decode step of many sequences is one batched step); empty
    # sequences keep their initial state; outputs and gradients equal the sequence-by-sequence form
    lens = [1, 1, 3, 1, 3, 0, 7, 1]
    H, D = 2, 4
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, sum(lens), H, D, generator=g, requires_grad=True) for _ in range(3))
    slopes = torch.tensor([0.4, 0.02])
    s0 = torch.randn(len(lens), H, D, D, generator=g) if with_state else None
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    o, s = lightning_attention(q, k, v, slopes, s0, output_final_state=True, cu_seqlens=cu, backend="reference")
    do = torch.randn(o.shape, generator=g)
    grads = torch.autograd.grad((o * do).sum() + s.sum(), (q, k, v))
    outs, states = [], []
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        init = s0[i:i + 1] if with_state else torch.zeros(1, H, D, D)
        o_i, s_i = lightning_naive(q[:, a:b], k[:, a:b], v[:, a:b], slopes, init)
        outs.append(o_i)
        states.append(s_i)
    o_ref, s_ref = torch.cat(outs, 1), torch.cat(states)
    assert rel(o, o_ref) < 1e-5 and rel(s, s_ref) < 1e-5
    assert torch.equal(s[5], s0[5] if with_state else torch.zeros(H, D, D))  # the empty sequence
    ref_grads = torch.autograd.grad((o_ref * do).sum() + s_ref.sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("block_size", [4, 7, 64])
def test_segmented_rows_equal_each_document_alone(block_size, span_budget):
    # documents that start mid-block, end on a block edge, span blocks, and a 1-token one
    lens = [[5, 3, 1, 14, 10], [33], [8, 8, 17]]
    H, D = 2, 8
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 33, H, D, generator=g, requires_grad=True) for _ in range(3))
    slopes = torch.tensor([0.3, 0.02])
    seg = torch.tensor([sum(([i] * n for i, n in enumerate(row)), []) for row in lens])
    do = torch.randn(3, 33, H, D, generator=g)
    o, state = lightning_attention(q, k, v, slopes, segment_ids=seg, block_size=block_size, backend="reference")
    assert state is None
    grads = torch.autograd.grad((o * do).sum(), (q, k, v))
    refs, parts = [], []
    for b, row in enumerate(lens):
        a = 0
        for n in row:
            refs.append(lightning_naive(q[b:b + 1, a:a + n], k[b:b + 1, a:a + n], v[b:b + 1, a:a + n], slopes)[0])
            parts.append((b, a, n))
            a += n
    for (b, a, n), ref in zip(parts, refs):
        assert rel(o[b:b + 1, a:a + n], ref) < 1e-5
    ref_loss = sum((ref * do[b:b + 1, a:a + n]).sum() for (b, a, n), ref in zip(parts, refs))
    for got, want in zip(grads, torch.autograd.grad(ref_loss, (q, k, v))):
        assert rel(got, want) < 1e-5
    # without segments the documents would see each other: the test can tell the difference
    plain, _ = lightning_attention(q, k, v, slopes, block_size=block_size, backend="reference")
    assert rel(plain, o) > 1e-2


def test_segmented_takes_no_states():
    q = torch.randn(1, 4, 1, 2)
    with pytest.raises(ValueError, match="segment_ids"):
        lightning_attention(q, q, q, torch.ones(1), torch.zeros(1, 1, 2, 2), segment_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="segment_ids must be"):
        lightning_attention(q, q, q, torch.ones(1), segment_ids=torch.zeros(1, 3, dtype=torch.long))
