import torch
import torch.nn.functional as F

from moco_engine.evaluation import knn_accuracy, knn_predict


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
