"""Retrieval quality measures: how well an encoder's embeddings keep tissue classes apart."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from histopilot.retrieval.vectors import normalized


def leave_one_out_knn(vectors: np.ndarray, labels: Sequence[str], *, k: int = 1) -> float:
    """Accuracy of labelling each vector by a majority vote of its ``k`` nearest others
    (cosine; ties go to the label with the higher summed similarity)."""
    unit = normalized(vectors)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    labels = list(labels)
    correct = 0
    for row, label in enumerate(labels):
        neighbours = np.argsort(-similarity[row])[:k]
        votes: Counter[str] = Counter()
        weight: Counter[str] = Counter()
        for neighbour in neighbours:
            votes[labels[neighbour]] += 1
            weight[labels[neighbour]] += float(similarity[row, neighbour])
        predicted = max(votes, key=lambda name: (votes[name], weight[name]))
        correct += predicted == label
    return correct / len(labels)
