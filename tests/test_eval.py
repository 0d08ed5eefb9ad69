"""Evaluation: weighted kNN and the linear probe on data with a known answer."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from smog.evaluation.knn import knn_accuracies, knn_accuracy
from smog.evaluation.linear import linear_probe


def clusters(n: int, seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    y = torch.randint(0, 4, (n,), generator=g)
    return F.normalize(centres[y] + noise * torch.randn(n, 16, generator=g), dim=1), y


def test_knn_separates_clusters_and_fails_on_shuffled_labels():
    train_f, train_y = clusters(400, 1, 0.1)
    test_f, test_y = clusters(100, 2, 0.1)
    assert knn_accuracy(train_f, train_y, test_f, test_y, k=20, temperature=0.07) == 100.0
    shuffled = train_y[torch.randperm(400, generator=torch.Generator().manual_seed(3))]
    assert knn_accuracy(train_f, shuffled, test_f, test_y, k=20, temperature=0.07) < 60.0


def test_knn_weights_votes_by_similarity():
    """One very close neighbour of class 1 outvotes two distant ones of class 0 at a low temperature."""
    train_f = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), dim=1)
    train_y = torch.tensor([1, 0, 0])
    query = F.normalize(torch.tensor([[1.0, 0.3]]), dim=1)
    assert knn_accuracy(train_f, train_y, query, torch.tensor([1]), k=3, temperature=0.1) == 100.0
    assert knn_accuracy(train_f, train_y, query, torch.tensor([1]), k=3, temperature=100.0) == 0.0


def test_one_pass_over_several_k_equals_each_k_by_its_definition():
    """Every (k, T) of one knn_accuracies call against a brute force per query: sort all similarities,
    take the k largest, sum exp(sim / T) per class, predict the largest sum."""
    train_f, train_y = clusters(300, 4, 0.8)
    test_f, test_y = clusters(70, 5, 0.8)
    pairs = [(200, 0.1), (20, 0.07), (1, 0.5), (500, 0.2)]
    got = knn_accuracies(train_f, train_y, test_f, test_y, [k for k, _ in pairs], [t for _, t in pairs], chunk=16)
    for (k, t), score in zip(pairs, got):
        hits = 0
        for query, label in zip(test_f, test_y):
            sims = [(float(query @ row), int(y)) for row, y in zip(train_f, train_y)]
            sims.sort(key=lambda pair: -pair[0])
            votes = [0.0] * 4
            for sim, y in sims[:k]:
                votes[y] += float(torch.tensor(sim / t).exp())
            hits += int(max(range(4), key=votes.__getitem__) == int(label))
        assert score == 100.0 * hits / len(test_y), (k, t)


def test_linear_probe_learns_separable_classes():
    train_f, train_y = clusters(400, 1, 0.3)
    test_f, test_y = clusters(200, 2, 0.3)
    assert linear_probe(train_f, train_y, test_f, test_y, epochs=20, lr=0.3, weight_decay=1e-6) > 90.0
