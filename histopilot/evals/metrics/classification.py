"""Classification metrics over string labels: accuracy, balanced accuracy, macro-F1, per-class
precision/recall/F1, one-vs-rest AUC and top-k accuracy from class scores, and the confusion
matrix.

Labels are strings throughout (tissue classes, diagnoses) so that results read on their own.
The class set is the union of the labels seen in the truth and the predictions: a class that
is never predicted, or predicted but never true, still counts in the macro averages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel
from sklearn import metrics


class ClassificationScores(BaseModel):
    """Scores of predicted labels against the truth.

    ``balanced_accuracy`` is the mean recall over the classes present in the truth
    (Brodersen et al., 2010), so each class weighs the same however rare; ``macro_f1`` is the
    unweighted mean F1 over all classes seen. ``auc`` and ``top_k`` need class scores: AUC is
    the ROC AUC (binary) or the macro one-vs-rest ROC AUC over the classes present in the
    truth (None with fewer than two present); ``top_k[k]`` is the fraction of items whose
    true class is among the k highest-scored. ``per_class`` maps each class to its
    precision, recall, f1 and support (its number of true items).
    """

    count: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    auc: float | None
    top_k: dict[int, float]
    per_class: dict[str, dict[str, float]]


def classification_scores(
    truth: Sequence[str],
    predicted: Sequence[str],
    *,
    scores: np.ndarray | None = None,
    classes: Sequence[str] | None = None,
    top_k: Sequence[int] = (),
) -> ClassificationScores:
    """Score ``predicted`` labels against ``truth``; with ``scores`` (N, C), whose columns
    are ``classes`` (higher = more likely; probabilities or logits), also AUC and top-k.

    In the binary case (two classes) the positive class is ``classes[1]``.
    """
    truth, predicted = list(truth), list(predicted)
    if len(truth) != len(predicted):
        raise ValueError(f"got {len(truth)} true labels but {len(predicted)} predictions.")
    if not truth:
        raise ValueError("no labels to score; give at least one item.")
    labels = sorted(set(truth) | set(predicted))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        truth, predicted, labels=labels, zero_division=0
    )
    present = support > 0
    auc, top = None, {}
    if scores is not None or top_k:
        columns, class_names = _scores(truth, scores, classes)
        auc = _auc(truth, columns, class_names)
        top = {k: _top_k_accuracy(truth, columns, class_names, k) for k in top_k}
    return ClassificationScores(
        count=len(truth),
        accuracy=metrics.accuracy_score(truth, predicted),
        balanced_accuracy=float(recall[present].mean()),
        macro_f1=float(f1.mean()),
        auc=auc,
        top_k=top,
        per_class={
            label: {
                "precision": float(precision[index]),
                "recall": float(recall[index]),
                "f1": float(f1[index]),
                "support": float(support[index]),
            }
            for index, label in enumerate(labels)
        },
    )


def confusion_matrix(
    truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
) -> list[list[int]]:
    """Counts of items by true label (rows) and predicted label (columns), in ``labels``
    order; items whose labels are not in ``labels`` are left out."""
    if len(truth) != len(predicted):
        raise ValueError(f"got {len(truth)} true labels but {len(predicted)} predictions.")
    return metrics.confusion_matrix(truth, predicted, labels=list(labels)).tolist()


def _scores(
    truth: list[str], scores: np.ndarray | None, classes: Sequence[str] | None
) -> tuple[np.ndarray, list[str]]:
    if scores is None or classes is None:
        raise ValueError("AUC and top-k accuracy need both scores (N, C) and their classes.")
    columns, class_names = np.asarray(scores, dtype=np.float64), list(classes)
    if columns.shape != (len(truth), len(class_names)):
        raise ValueError(
            f"expected scores of shape (items, classes) = ({len(truth)}, {len(class_names)}); "
            f"got {columns.shape}."
        )
    unknown = sorted(set(truth) - set(class_names))
    if unknown:
        raise ValueError(f"true labels {unknown} are not among the scored classes {class_names}.")
    return columns, class_names


def _auc(truth: list[str], columns: np.ndarray, class_names: list[str]) -> float | None:
    present = [index for index, name in enumerate(class_names) if name in truth]
    if len(present) < 2:
        return None
    # Binary: the second class against the first; otherwise each present class against the rest.
    positives = [1] if len(class_names) == 2 else present
    return float(
        np.mean(
            [
                metrics.roc_auc_score(
                    [label == class_names[index] for label in truth], columns[:, index]
                )
                for index in positives
            ]
        )
    )


def _top_k_accuracy(truth: list[str], columns: np.ndarray, class_names: list[str], k: int) -> float:
    if k < 1:
        raise ValueError(f"top-k accuracy needs k ≥ 1; got {k}.")
    best = np.argsort(-columns, axis=1, kind="stable")[:, :k]
    wanted = np.array([class_names.index(label) for label in truth])
    return float((best == wanted[:, None]).any(axis=1).mean())
