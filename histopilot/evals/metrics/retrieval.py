"""Retrieval metrics: how often the items retrieved for a query share its label.

Retrieval here ranks by cosine similarity, best first. The measures are those of
histopathology image retrieval: top-k accuracy (the label among the first k), and the
majority vote of the first k (MV@k, which is k-NN classification accuracy) with its
class-averaged form mMV@k. :func:`leave_one_out_knn` scores an encoder's embeddings of a
labelled set by retrieving, for each item, from all the others.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel


def majority_vote(labels: Sequence[str], similarities: Sequence[float]) -> str:
    """The most frequent of ``labels``; a tie goes to the label with the higher summed
    similarity, then to the label ranked first."""
    if not labels or len(labels) != len(similarities):
        raise ValueError(
            f"a vote needs one similarity per label and at least one label; got {len(labels)} "
            f"labels and {len(similarities)} similarities."
        )
    votes: Counter[str] = Counter(labels)
    weight: Counter[str] = Counter()
    for label, similarity in zip(labels, similarities, strict=True):
        weight[label] += float(similarity)
    return max(votes, key=lambda label: (votes[label], weight[label]))


def leave_one_out_neighbours(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the indices (N, k) and cosine similarities (N, k) of its k most similar
    other rows, best first (ties in row order). ``k`` is capped at N − 1.

    Similarities are float32, from L2-normalised rows; an all-zero row is similar (0) to all.
    """
    unit = _unit(vectors)
    if len(unit) < 2:
        raise ValueError(f"expected at least two vectors; got {len(unit)}.")
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return _best(similarity, min(k, len(unit) - 1))


def knn_labels(queries: np.ndarray, bank: np.ndarray, labels: Sequence[str], k: int) -> list[str]:
    """The label each query's ``k`` most cosine-similar bank vectors vote for
    (:func:`majority_vote`): a k-NN classifier over a labelled bank."""
    if len(labels) != len(bank):
        raise ValueError(f"got {len(bank)} bank vectors but {len(labels)} labels.")
    order, similarity = _best(_unit(queries) @ _unit(bank).T, min(k, len(bank)))
    return [
        majority_vote([labels[j] for j in row], list(scores))
        for row, scores in zip(order, similarity, strict=True)
    ]


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32; an all-zero row stays zero), checked first."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2 or not len(array):
        raise ValueError(f"expected a non-empty 2-D array of vectors; got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError("some vectors hold NaN or infinite values; the encoder failed on those.")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.divide(array, norms, out=np.zeros_like(array), where=norms > 0)


def _best(similarity: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of each row's ``k`` largest entries, best first (stable)."""
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}.")
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(similarity, order, axis=1)


def leave_one_out_knn(vectors: np.ndarray, labels: Sequence[str], *, k: int = 1) -> float:
    """Accuracy of labelling each vector by a majority vote of its ``k`` nearest others
    (cosine; ties go to the label with the higher summed similarity)."""
    labels = list(labels)
    if len(labels) != len(vectors):
        raise ValueError(f"got {len(vectors)} vectors but {len(labels)} labels.")
    neighbours, similarities = leave_one_out_neighbours(vectors, k)
    correct = sum(
        majority_vote([labels[index] for index in row], scores) == label
        for label, row, scores in zip(labels, neighbours, similarities, strict=True)
    )
    return correct / len(labels)


class RetrievalScores(BaseModel):
    """Retrieval quality at each cut-off k, over ``count`` queries.

    - ``accuracy_at_k[k]``: fraction of queries whose label is among the first k results
      (top-k accuracy, or hit rate).
    - ``majority_vote_at_k[k]``: MV@k, fraction of queries whose label wins the majority
      vote of the first k results (:func:`majority_vote`); the micro average, k-NN accuracy.
    - ``mean_majority_vote_at_k[k]``: mMV@k, MV@k averaged within each query class, then
      over classes, so that every class weighs the same however many queries it has; the
      macro form reported in histopathology retrieval (e.g. SISH, Chen et al., 2022;
      RetCCL, Wang et al., 2023).

    A query with fewer than k results is judged on those it has; one with none is a miss.
    """

    count: int
    k: list[int]
    accuracy_at_k: dict[int, float]
    majority_vote_at_k: dict[int, float]
    mean_majority_vote_at_k: dict[int, float]


def retrieval_scores(
    query_labels: Sequence[str],
    ranked_labels: Sequence[Sequence[str]],
    ranked_similarities: Sequence[Sequence[float]],
    *,
    k: Sequence[int] = (1, 3, 5),
) -> RetrievalScores:
    """Score each query's ranked results (labels and similarities, best first)."""
    if not (len(query_labels) == len(ranked_labels) == len(ranked_similarities)):
        raise ValueError(
            f"got {len(query_labels)} queries, {len(ranked_labels)} ranked label lists and "
            f"{len(ranked_similarities)} similarity lists; give one of each per query."
        )
    if not query_labels:
        raise ValueError("no queries to score; give at least one.")
    cutoffs = sorted(set(k))
    if cutoffs[0] < 1:
        raise ValueError(f"every k must be at least 1; got {list(k)}.")
    accuracy, vote, mean_vote = {}, {}, {}
    for cutoff in cutoffs:
        hits, wins = [], []
        for label, labels, similarities in zip(
            query_labels, ranked_labels, ranked_similarities, strict=True
        ):
            first, scores = list(labels)[:cutoff], list(similarities)[:cutoff]
            hits.append(label in first)
            wins.append(bool(first) and majority_vote(first, scores) == label)
        accuracy[cutoff], vote[cutoff] = float(np.mean(hits)), float(np.mean(wins))
        mean_vote[cutoff] = _class_mean(wins, query_labels)
    return RetrievalScores(
        count=len(query_labels),
        k=cutoffs,
        accuracy_at_k=accuracy,
        majority_vote_at_k=vote,
        mean_majority_vote_at_k=mean_vote,
    )


def _class_mean(outcomes: list[bool], labels: Sequence[str]) -> float:
    """The mean of ``outcomes`` within each label, then over labels."""
    by_label: defaultdict[str, list[bool]] = defaultdict(list)
    for outcome, label in zip(outcomes, labels, strict=True):
        by_label[label].append(outcome)
    return float(np.mean([np.mean(group) for group in by_label.values()]))
