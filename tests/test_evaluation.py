import torch
import torch.nn.functional as F

from moco_engine.evaluation.knn import knn_accuracy, knn_predict


def brute_force_knn(query, memory, labels, num_classes, k, t):
    scores = torch.zeros(query.shape[0], num_classes)
    for i, f in enumerate(query):
        sims = [(float(f @ m), int(c)) for m, c in zip(memory, labels)]
        for sim, c in sorted(sims, reverse=True)[:k]:
            scores[i, c] += torch.exp(torch.tensor(sim / t))
    return scores


def test_weighted_knn_matches_brute_force_in_any_chunking():
    g = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (40,), generator=g)
    query = F.normalize(torch.randn(13, 8, generator=g), dim=1)
    expected = brute_force_knn(query, memory, labels, 4, k=7, t=0.1)
    for chunk in (1, 5, 100):
        got = knn_predict(query, memory, labels, 4, k=7, temperature=0.1, chunk_size=chunk)
        assert torch.allclose(got, expected, rtol=1e-4)


def test_knn_accuracy_on_separable_features():
    centers = F.normalize(torch.eye(3, 5), dim=1)
    memory = centers.repeat_interleave(10, 0) + 0.01 * torch.randn(30, 5)
    labels = torch.arange(3).repeat_interleave(10)
    acc = knn_accuracy(F.normalize(memory, dim=1), labels, F.normalize(memory, dim=1), labels, 3, k=200, temperature=0.1)
    assert acc["knn_top1"] == 100.0 and acc["knn_top5"] == 100.0


def test_cached_linear_probe_separates_linearly_separable_features():
    from moco_engine.config.schema import LinearConfig
    from moco_engine.evaluation.probe import linear_probe_cached

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 4, generator=g)

    def split(n):
        x = torch.randn(n, 16, generator=g)
        return x, (x @ w).argmax(1)  # classes cut by hyperplanes: linearly separable

    cfg = LinearConfig(epochs=30, milestones=[20, 25], batch_size=64)
    result = linear_probe_cached(split(2000), split(500), 4, cfg)
    assert result["top1"] > 95.0 and result["top5"] == 100.0


def test_linear_probe_trains_only_the_fc_and_checks_the_backbone():
    from torch import nn

    from moco_engine.config.schema import LinearConfig
    from moco_engine.evaluation.probe import linear_probe

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    x = torch.randn(256, 6)
    y = (x[:, 0] > 0).long()
    batches = [(x[i : i + 32], y[i : i + 32], None) for i in range(0, 256, 32)]
    cfg = LinearConfig(epochs=20, lr=1.0, milestones=[15], batch_size=32)
    result = linear_probe(backbone, batches, batches, 8, 2, cfg, torch.device("cpu"))
    assert result["top1"] > 80.0
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())  # BN stats too
    assert backbone.training  # its mode is given back

    class Drifting(nn.Module):  # a backbone that changes itself: the probe must notice
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(6))

        def forward(self, v):
            with torch.no_grad():
                self.scale.mul_(1.01)
            return v * self.scale

    import pytest

    with pytest.raises(RuntimeError, match="backbone changed"):
        linear_probe(Drifting(), batches, batches, 6, 2, LinearConfig(epochs=1), torch.device("cpu"))


def test_the_probe_schedules_are_the_two_main_lincls_by_hand_and_the_fc_steps_at_those_rates():
    """MoCo v1/v2: lr 30, x0.1 at epochs 60 and 80. MoCo v3 (ViT): 3 x 1024/256 = 12, then
    12·½(1 + cos(π·e/90)) in epoch e."""
    import math

    from moco_engine.config.loading import load_config
    from moco_engine.config.schema import LinearConfig
    from moco_engine.evaluation.probe import fit_linear, probe_lr

    v1 = load_config(["configs/linear/moco.yaml"]).linear
    assert [probe_lr(v1, e) for e in (0, 59, 60, 79, 80, 99)] == [30.0, 30.0, 30.0 * 0.1, 30.0 * 0.1,
                                                                   30.0 * 0.1 ** 2, 30.0 * 0.1 ** 2]
    v3 = load_config(["configs/linear/moco_v3_vit.yaml"]).linear
    assert probe_lr(v3, 0) == 12.0 and probe_lr(v3, 45) == 12.0 * 0.5 * (1 + math.cos(math.pi / 2))
    assert abs(probe_lr(v3, 89) - 12 * 0.5 * (1 + math.cos(math.pi * 89 / 90))) < 1e-15
    assert load_config(["configs/linear/moco_v3_resnet.yaml"]).linear.lr * 1024 / 256 == probe_lr(
        load_config(["configs/linear/moco_v3_resnet.yaml"]).linear, 0)
    # One sample, one step per epoch, no momentum: each epoch moves the bias by exactly lr_e x its gradient.
    cfg = LinearConfig(epochs=3, lr=0.5, lr_scaling="linear", schedule="cosine", momentum=0.0, batch_size=512)
    seen = []

    def batches(epoch):
        seen.append(epoch)
        yield torch.zeros(1, 2), torch.tensor([0])

    fc = fit_linear(batches, 2, 2, cfg, torch.device("cpu"))
    bias, p = torch.zeros(2), torch.full((2,), 0.5)
    for e in range(3):  # zero features: only the bias learns; softmax gradient p - onehot
        p = torch.softmax(bias, 0)
        bias = bias - probe_lr(cfg, e) * (p - torch.tensor([1.0, 0.0]))
    assert seen == [0, 1, 2] and torch.allclose(fc.bias.detach(), bias, atol=1e-6)
