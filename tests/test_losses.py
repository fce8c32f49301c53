import math

import torch
import torch.nn.functional as F

from moco_engine.losses import estimate_log_z, info_nce, info_nce_logits, instance_accuracy, nce


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
