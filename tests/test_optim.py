"""Muon and AdamW (xinzhou.optim): the orthogonalisation, the update rules, the parameter split."""

import pytest
import torch

from xinzhou.config import preset
from xinzhou.model import XinzhouLM
from xinzhou.optim import MuonAdamW, is_muon_param, make_optimizer, orthogonalize
from xinzhou.train import TrainConfig


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (32, 32 * 3), (96, 40)])
def test_orthogonalize_gives_the_polar_factor_approximately(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    o = orthogonalize(g)
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.6 and s.max() < 1.25, s  # Muon's quintic: near 1, not exactly 1
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    cos = (o * polar).sum() / (o.norm() * polar.norm())
    assert cos > 0.97
    assert (orthogonalize(g * 1e-4) - o).abs().max() < 1e-4  # scale-free: g is normalised first


def test_orthogonalize_treats_each_expert_matrix_alone():
    g = torch.randn(4, 48, 16, generator=torch.Generator().manual_seed(1))
    g[2] *= 100  # one expert's gradient much larger: it must not shrink the others
    batched = orthogonalize(g)
    for e in range(4):
        torch.testing.assert_close(batched[e], orthogonalize(g[e]), rtol=1e-5, atol=1e-6)


def _tiny():
    torch.manual_seed(0)
    return XinzhouLM(preset("tiny", vocab_size=64))


def _fake_grads(model, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def test_muon_split_names_the_hidden_matrices_only():
    model = _tiny()
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), kind="muon", muon_lr=0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]]
    assert any(n.endswith("w13") for n in muon) and any(n.endswith("q_proj.weight") for n in muon)
    assert any(n.endswith("qkv_proj.weight") for n in muon)  # lightning's projections are hidden matrices
    assert not any(n.startswith(("embed", "lm_head")) or n.endswith(("moe.gate.weight", "output_gate.weight",
                                                                     "norm.weight")) for n in muon)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    (mg,) = [g for g in opt.param_groups if g["muon"]]
    assert mg["lr_ratio"] == pytest.approx(20.0) and mg["weight_decay"] * mg["lr_ratio"] == pytest.approx(0.1)


def test_non_muon_groups_step_exactly_as_torch_adamw():
    ours, ref = _tiny(), _tiny()
    opt = make_optimizer(ours, 1e-2, 0.1, (0.9, 0.95), kind="muon")
    ref_opt = make_optimizer(ref, 1e-2, 0.1, (0.9, 0.95), kind="adamw")
    for step in range(5):
        _fake_grads(ours, step)
        _fake_grads(ref, step)
        opt.step()
        ref_opt.step()
    moved = 0
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        if not is_muon_param(n, p):
            assert torch.equal(p, q), n  # the same fused kernel
            moved += int(not torch.equal(p, _tiny().get_parameter(n)))
    assert moved > 0


def test_muon_step_is_nesterov_momentum_orthogonalised_and_scaled():
    w0 = torch.randn(48, 16, generator=torch.Generator().manual_seed(2))
    p = torch.nn.Parameter(w0.clone())
    opt = MuonAdamW([dict(params=[p], muon=True)], lr=0.1, weight_decay=0.5, momentum=0.9)
    g1, g2 = torch.randn(48, 16), torch.randn(48, 16)
    p.grad = g1
    opt.step()
    p.grad = g2
    opt.step()
    scale = (48 / 16) ** 0.5
    w = w0 * (1 - 0.1 * 0.5) - 0.1 * scale * orthogonalize(g1 + 0.9 * g1)
    m2 = 0.9 * g1 + g2
    w = w * (1 - 0.1 * 0.5) - 0.1 * scale * orthogonalize(g2 + 0.9 * m2)
    torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)


def test_bad_optimizer_choices_are_named():
    with pytest.raises(ValueError, match="'sgd'"):
        make_optimizer(_tiny(), 1e-3, 0.1, (0.9, 0.95), kind="sgd")
    with pytest.raises(ValueError, match="optimizer = 'lion'"):
        TrainConfig(data="d", out_dir="o", optimizer="lion")
    with pytest.raises(ValueError, match="muon_lr = 0"):
        TrainConfig(data="d", out_dir="o", optimizer="muon", muon_lr=0.0)
    with pytest.raises(ValueError, match="matrices"):
        MuonAdamW([dict(params=[torch.nn.Parameter(torch.ones(3))], muon=True)], lr=0.1)
