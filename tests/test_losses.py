import math

import torch
import torch.nn.functional as F

from moco_engine.method.losses import (
    estimate_log_z,
    info_nce,
    info_nce_logits,
    instance_accuracy,
    nce,
)


def test_info_nce_equals_a_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    negatives = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]])
    t = 0.5
    logits = info_nce_logits(q, k, negatives, t)
    # Row 0: q=(1,0): l_pos = 0.6; l_neg = (1, -1, 0). Row 1: q=(0,1): l_pos = 1; l_neg = (0, 0, -1).
    expected = torch.tensor([[0.6, 1.0, -1.0, 0.0], [1.0, 0.0, 0.0, -1.0]]) / t
    assert torch.allclose(logits, expected)
    by_hand = []
    for row in expected.tolist():
        by_hand.append(-row[0] + math.log(sum(math.exp(v) for v in row)))
    assert math.isclose(info_nce(logits).item(), sum(by_hand) / 2, rel_tol=1e-6)
    assert torch.allclose(info_nce(logits), F.cross_entropy(logits, torch.zeros(2, dtype=torch.long)))


def test_logits_are_float32_under_low_precision_inputs():
    q = torch.randn(3, 4).bfloat16()
    logits = info_nce_logits(q, q, torch.randn(5, 4).bfloat16(), 0.07)
    assert logits.dtype == torch.float32 and logits.shape == (3, 6)


def test_instance_accuracy_counts_the_positive_rank():
    logits = torch.tensor(
        [
            [5.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0],  # rank 0: top1 and top5
            [2.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # rank 1: top5 only
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # rank 6: neither
            [1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0],  # rank 4: top5
        ]
    )
    acc = instance_accuracy(logits)
    assert acc["top1"].item() == 25.0
    assert acc["top5"].item() == 75.0


def test_nce_equals_a_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [1.0, 1.5, float("-inf")]])  # K = 2; one dropped negative
    n, log_z = 10, torch.tensor(1.2)
    noise = 2 / 10  # K * P_n
    total = 0.0
    for row in logits.tolist():
        p = [math.exp(v - 1.2) for v in row]
        total += -math.log(p[0] / (p[0] + noise))
        total += -sum(math.log(1 - pj / (pj + noise)) for pj in p[1:])
    assert math.isclose(nce(logits, n, log_z).item(), total / 2, rel_tol=1e-5)
    z = estimate_log_z(logits, n)  # log(N * mean of the finite negatives' exp)
    assert math.isclose(z.item(), math.log(10 * (math.exp(0.5) + math.exp(-1.0) + math.exp(1.5)) / 3), rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------
# The objectives of the registry, each against a hand computation on tiny tensors
# ---------------------------------------------------------------------------------------------
import math as _math  # noqa: E402

import pytest as _pytest  # noqa: E402

from moco_engine.method.losses import (  # noqa: E402
    byol_loss,
    debiased_loss,
    info_nce_loss,
    lifted_structured_loss,
    mochi_loss,
    mochi_negatives,
    n_pair_loss,
    pair_loss,
    triplet_loss,
)
from moco_engine.method.objectives import LOSSES  # noqa: E402


def _tiny(seed=0, b=3, k=5, d=4):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    return unit(b, d), unit(b, d), unit(k, d)


def _d2(a, b):
    return float(((a - b) ** 2).sum())


def test_pair_loss_by_hand():
    q, p, n = _tiny()
    expected = sum(_d2(q[i], p[i]) + sum(max(0.0, 1.0 - _d2(q[i], x)) for x in n) / len(n) for i in range(3)) / 3
    assert pair_loss(q, p, n, pair_margin=1.0).item() == _pytest.approx(expected, rel=1e-5)


def test_triplet_loss_by_hand_and_with_a_drop_mask():
    q, p, n = _tiny(1)
    drop = torch.zeros(3, 5, dtype=torch.bool)
    drop[0, :2] = True
    expected = 0.0
    for i in range(3):
        kept = [x for j, x in enumerate(n) if not drop[i, j]]
        expected += sum(max(0.0, _d2(q[i], p[i]) - _d2(q[i], x) + 0.2) for x in kept) / len(kept)
    assert triplet_loss(q, p, n, drop, triplet_margin=0.2).item() == _pytest.approx(expected / 3, rel=1e-5)


def test_lifted_structured_loss_by_hand():
    q, p, n = _tiny(2)
    expected = 0.0
    for i in range(3):
        s = sum(_math.exp(1.0 - _math.sqrt(_d2(q[i], x))) + _math.exp(1.0 - _math.sqrt(_d2(p[i], x))) for x in n)
        j = _math.log(s) + _math.sqrt(_d2(q[i], p[i]))
        expected += max(0.0, j) ** 2
    assert lifted_structured_loss(q, p, n, lifted_margin=1.0).item() == _pytest.approx(expected / 6, rel=1e-5)


def test_n_pair_loss_by_hand():
    q, p, n = _tiny(3)
    expected = sum(_math.log(1 + sum(_math.exp(float(q[i] @ x - q[i] @ p[i])) for x in n)) for i in range(3)) / 3
    assert n_pair_loss(q, p, n).item() == _pytest.approx(expected, rel=1e-5)


def test_info_nce_by_hand():
    q, p, n = _tiny(4)
    t = 0.5
    expected = -sum(
        float(q[i] @ p[i]) / t - _math.log(_math.exp(float(q[i] @ p[i]) / t) + sum(_math.exp(float(q[i] @ x) / t) for x in n))
        for i in range(3)
    ) / 3
    assert info_nce_loss(q, p, n, temperature=t).item() == _pytest.approx(expected, rel=1e-5)


def test_debiased_loss_by_hand_and_equal_to_infonce_at_tau_zero():
    q, p, n = _tiny(5)
    t, tau = 0.5, 0.1
    expected = 0.0
    for i in range(3):
        pos = _math.exp(float(q[i] @ p[i]) / t)
        neg = sum(_math.exp(float(q[i] @ x) / t) for x in n) / len(n)
        g = max((neg - tau * pos) / (1 - tau), _math.exp(-1 / t))
        expected += -_math.log(pos / (pos + len(n) * g))
    assert debiased_loss(q, p, n, temperature=t, tau_plus=tau).item() == _pytest.approx(expected / 3, rel=1e-5)
    q, p, n = _tiny(6, b=8, k=50, d=16)
    drop = torch.rand(8, 50, generator=torch.Generator().manual_seed(0)) < 0.2
    torch.testing.assert_close(debiased_loss(q, p, n, drop, temperature=0.07, tau_plus=0.0),
                               info_nce_loss(q, p, n, drop, temperature=0.07))


def test_mochi_without_mixed_negatives_is_infonce_and_its_mixes_are_hard_unit_vectors():
    q, p, n = _tiny(7, b=4, k=64, d=8)
    torch.testing.assert_close(mochi_loss(q, p, n, temperature=0.2, mochi_mix=0, mochi_mix_query=0),
                               info_nce_loss(q, p, n, temperature=0.2))
    g = torch.Generator().manual_seed(1)
    mixed = mochi_negatives(q, n, hardest=8, mix=16, mix_query=16, generator=g)
    assert mixed.shape == (4, 32, 8) and torch.allclose(mixed.norm(dim=2), torch.ones(4, 32, dtype=mixed.dtype))
    # Synthetic negatives from the 8 hardest are harder on average than the queue's negatives.
    sims = torch.einsum("bd,bmd->bm", q, mixed[:, :16])
    assert sims.mean() > (q @ n.t()).mean()
    # Mixed with the query (beta <= 0.5), they are closer to it still.
    assert torch.einsum("bd,bmd->bm", q, mixed[:, 16:]).mean() > sims.mean()
    assert mochi_loss(q, p, n, temperature=0.2, mochi_hardest=8, mochi_mix=16, mochi_mix_query=16, generator=g) > \
        info_nce_loss(q, p, n, temperature=0.2)  # harder negatives, larger loss


def test_byol_loss_by_hand():
    p, t, _ = _tiny(8)
    expected = sum(2 - 2 * float(p[i] @ t[i]) for i in range(3)) / 3
    assert byol_loss(p * 3.0, t).item() == _pytest.approx(expected, rel=1e-5)  # scale-free


@_pytest.mark.parametrize("name", ["pair", "triplet", "lifted", "npair", "debiased", "infonce"])
def test_gradients_match_finite_differences(name):
    q, p, n = _tiny(9, b=2, k=4, d=3)
    q = q.clone().requires_grad_()
    from moco_engine.config.schema import LossConfig
    from moco_engine.method.negatives import Negatives, Queue
    from moco_engine.method.objectives import build_objective

    objective = build_objective(LossConfig(name=name, temperature=0.5, tau_plus=0.1), Queue(4, 3))
    fn = lambda x: objective(x, p, Negatives(n), info_nce_logits(x, p, n, 0.5))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q,), eps=1e-6, atol=1e-5)


def test_the_registry_names_every_objective():
    assert set(LOSSES) == {"infonce", "nt_xent", "nce", "pair", "triplet", "lifted", "npair", "debiased", "mochi"}
    from moco_engine.config.registry import registry

    assert registry("loss.name") is LOSSES  # the config's choices are the registry's names


def test_mochi_never_mixes_a_dropped_negative_and_picks_its_pool_in_float32_under_bf16():
    q, _, n = _tiny(11, b=4, k=32, d=8)
    negatives = torch.cat([q, n])  # each query's own vector: by far its most similar "negative"
    drop = torch.zeros(4, 36, dtype=torch.bool)
    drop[torch.arange(4), torch.arange(4)] = True  # ... but dropped, as in-batch drops a query's own views
    # From a pool of one (the hardest counted negative), every mix is that negative itself.
    mixed = mochi_negatives(q, negatives, hardest=1, mix=3, mix_query=0, generator=torch.Generator().manual_seed(0),
                            drop=drop)
    best = (q @ negatives.t()).masked_fill(drop, float("-inf")).argmax(1)
    torch.testing.assert_close(mixed, negatives[best][:, None].expand(-1, 3, -1).to(mixed.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_bf16 = mochi_negatives(q, negatives, hardest=1, mix=3, mix_query=0,
                                     generator=torch.Generator().manual_seed(0), drop=drop)
    torch.testing.assert_close(under_bf16, mixed)
