"""Evaluation metrics, each checked against a value worked out by hand or by a reference
library on small fixed inputs."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy, wasserstein_distance
from skimage.metrics import normalized_root_mse, structural_similarity
from sklearn.metrics import balanced_accuracy_score
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import poly_mmd

from histopilot.evals.metrics import (
    classification_scores,
    confusion_matrix,
    distribution_scores,
    exact_match,
    frechet_distance,
    histogram_divergences,
    java_available,
    js_divergence,
    kernel_distance,
    kl_divergence,
    knn_labels,
    leave_one_out_knn,
    leave_one_out_neighbours,
    lpips,
    mae,
    majority_vote,
    mmd,
    ms_ssim,
    normalise_answer,
    nrmse,
    psnr,
    retrieval_scores,
    ssim,
    text_scores,
    token_f1,
    tokens,
    wasserstein,
)
from histopilot.evals.metrics import image as image_metrics
from histopilot.evals.metrics import text as text_metrics

# ---------------------------------------------------------------- text


def test_tokens_and_answer_normalisation_drop_case_punctuation_and_articles():
    assert tokens("HER2-positive, 3+ cells.") == ["her2", "positive", "3", "cells"]
    assert normalise_answer("  The tumour is   PRESENT. ") == "tumour is present"
    assert normalise_answer("An eosinophil; a lymphocyte") == "eosinophil lymphocyte"


def test_exact_match_and_token_f1_on_a_short_answer():
    assert exact_match("The tumour is present.", "tumour is present")
    assert not exact_match("The tumour is present.", "tumour present")
    # Tokens "tumour is present" against "tumour present": 2 shared of 3 and of 2.
    precision, recall = 2 / 3, 2 / 2
    f1 = 2 * precision * recall / (precision + recall)
    assert token_f1("The tumour is present.", "tumour present") == pytest.approx(f1)  # 0.8
    assert token_f1("benign", "malignant") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("the", "") == 1.0  # only an article: both normalise to nothing
    assert token_f1("", "tumour") == 0.0


def test_bleu_of_a_short_candidate_carries_the_brevity_penalty():
    # Candidate 5 words, reference 6: every unigram matches (p1 = 1), bigrams "the cat",
    # "on the", "the mat" of 4 (p2 = 3/4), brevity penalty exp(1 - 6/5).
    scores = text_scores(["The cat on the mat."], [["The cat is on the mat."]], meteor=False)
    penalty = math.exp(1 - 6 / 5)
    assert scores.bleu_1 == pytest.approx(penalty, abs=1e-6)
    assert scores.bleu_2 == pytest.approx(penalty * math.sqrt(3 / 4), abs=1e-6)
    assert scores.bleu_4 < scores.bleu_2
    assert scores.count == 1
    identical = text_scores(["the cat sat"], [["The cat sat."]], meteor=False)
    assert identical.bleu_1 == pytest.approx(1.0, abs=1e-6)
    assert identical.bleu_3 == pytest.approx(1.0, abs=1e-6)


def test_rouge_l_is_the_lcs_f_measure():
    # LCS of the two is "tumour cells invade stroma": 4 of the candidate's 5 words and of
    # the reference's 8; COCO weighs recall with beta = 1.2.
    candidate, reference = (
        "tumour cells invade the stroma",
        "the tumour cells are seen to invade stroma",
    )
    precision, recall, beta = 4 / 5, 4 / 8, 1.2
    expected = (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    scores = text_scores([candidate], [[reference]], meteor=False)
    assert scores.rouge_l == pytest.approx(expected)
    # With several references, the best-matching one counts.
    assert text_scores([candidate], [["nothing alike", candidate]], meteor=False).rouge_l == 1.0


def test_cider_needs_a_corpus_and_rewards_the_right_pairing():
    references = [
        "a nest of atypical cells in the dermis",
        "glands lined by columnar epithelium",
        "sheets of lymphocytes with germinal centres",
        "necrotic debris surrounded by neutrophils",
    ]
    matched = text_scores(references, [[r] for r in references], meteor=False)
    shuffled = text_scores(references[1:] + references[:1], [[r] for r in references], meteor=False)
    assert matched.cider > 1.0 > shuffled.cider
    # One pair: every n-gram appears in every reference "document", so its IDF is 0.
    assert text_scores([references[0]], [[references[0]]], meteor=False).cider == 0.0


def test_empty_texts_score_zero_without_crashing():
    scores = text_scores(["", "glands"], [["glands present"], ["glands"]], meteor=False)
    # Corpus BLEU-1: the one candidate word matches, but 1 word against 3 reference words.
    assert scores.bleu_1 == pytest.approx(math.exp(1 - 3 / 1), abs=1e-6)
    assert scores.rouge_l == pytest.approx((0.0 + 1.0) / 2)
    nothing = text_scores(["", "?"], [[""], ["..."]], meteor=False)  # no words anywhere
    assert nothing.cider == 0.0 and nothing.count == 2
    with pytest.raises(ValueError, match="one list of references per candidate"):
        text_scores(["a"], [], meteor=False)
    with pytest.raises(ValueError, match="no references"):
        text_scores(["a"], [[]], meteor=False)


def test_meteor_is_skipped_with_a_reason_without_java(monkeypatch):
    monkeypatch.setattr(text_metrics, "java_available", lambda: False)
    scores = text_scores(["glands present"], [["glands present"]])
    assert scores.meteor is None
    assert "no Java" in scores.meteor_note
    assert text_scores(["a"], [["a"]], meteor=False).meteor is None


@pytest.mark.parametrize(
    ("java", "reason"), [("exit 1", "exits at once"), ("exec sleep 600", "never answers")]
)
def test_a_failing_java_leaves_meteor_none_with_the_reason(monkeypatch, tmp_path, java, reason):
    fake = tmp_path / "java"
    fake.write_text(f"#!/bin/sh\n{java}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(text_metrics, "METEOR_START_S", 0.5)  # the watchdog's limit
    scores = text_scores(["glands present"], [["glands present"]])
    assert scores.meteor is None, reason
    assert scores.meteor_note.startswith("METEOR failed")
    assert scores.bleu_1 == pytest.approx(1.0, abs=1e-6)  # the other scores are unaffected


@pytest.mark.slow  # METEOR's Java process loads its paraphrase tables first (~10 s)
@pytest.mark.skipif(not java_available(), reason="METEOR needs a Java runtime")
def test_meteor_of_identical_sentences_is_one():
    sentences = ["the tumour invades the muscularis propria", "no tumour | seen\nhere"]
    scores = text_scores(sentences, [[s] for s in sentences])
    assert scores.meteor == pytest.approx(1.0, abs=0.01), scores.meteor_note
    assert scores.meteor_note == ""


# ---------------------------------------------------------------- image


def _smooth_tile(seed: int, size: int = 64) -> np.ndarray:
    """A uint8 (1, size, size, 3) tile with structure at several scales."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 220, (1, size // 8, size // 8, 3))
    tile = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2) + rng.normal(
        0, 10, (1, size, size, 3)
    )
    return tile.clip(0, 255).astype(np.uint8)


def _noisy(tile: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, tile.shape)
    return (tile + noise).clip(0, 255).astype(np.uint8)


def test_ssim_is_one_for_identical_images_and_agrees_with_scikit_image():
    tile = _smooth_tile(0, size=64)
    noisy = tile.copy()
    noisy[:, 16:48, 16:48] = _noisy(tile[:, 16:48, 16:48], 20)  # changed away from the edges
    assert ssim(tile, tile) == [pytest.approx(1.0)]
    reference = structural_similarity(
        tile[0] / 255,
        noisy[0] / 255,
        channel_axis=-1,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    # Same 11-px Gaussian window and constants. scikit-image averages over the interior,
    # leaving out a 5-px border; we average over every pixel, and here the border's windows
    # see no change (SSIM 1). So: ours = (interior mean × interior + border) / all.
    interior, every = 54**2, 64**2
    assert ssim(tile, noisy)[0] == pytest.approx(
        (reference * interior + every - interior) / every, abs=1e-5
    )
    assert reference < 0.95  # the change is visible
    small = _smooth_tile(0, size=8)
    assert ssim(small, small) == [pytest.approx(1.0)]
    assert ssim(small, _noisy(small, 40))[0] < 1.0


def test_psnr_mae_and_nrmse_of_a_constant_offset():
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 246, (2, 16, 16, 3), dtype=np.uint8)
    brighter = tile + np.uint8(10)  # 10 grey levels everywhere, no clipping
    assert psnr(tile, brighter) == pytest.approx([20 * math.log10(255 / 10)] * 2, abs=1e-4)
    assert mae(tile, brighter) == pytest.approx([10 / 255] * 2)
    assert psnr(tile, tile) == pytest.approx([100.0, 100.0])  # the error is floored
    expected = [
        normalized_root_mse(t.astype(float), b.astype(float))
        for t, b in zip(tile, brighter, strict=True)
    ]
    assert nrmse(tile, brighter) == pytest.approx(expected, rel=1e-5)


def test_ms_ssim_falls_with_noise_and_refuses_tiny_images():
    tile = _smooth_tile(0, size=64)
    light, heavy = ms_ssim(tile, _noisy(tile, 5))[0], ms_ssim(tile, _noisy(tile, 30))[0]
    assert ms_ssim(tile, tile) == [pytest.approx(1.0)]
    assert 1.0 > light > heavy > 0.0
    full = _smooth_tile(0, size=176)  # the smallest size for all five scales
    assert ms_ssim(full, full) == [pytest.approx(1.0)]
    tiny = np.zeros((1, 5, 5, 3), np.uint8)
    with pytest.raises(ValueError, match="at least 6 px"):
        ms_ssim(tiny, tiny)


def test_ms_ssim_at_full_size_is_torchmetrics_default():
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    tile = _smooth_tile(0, size=176)
    noisy = _noisy(tile, 10)
    unit = [torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 for x in (tile, noisy)]
    expected = multiscale_structural_similarity_index_measure(
        *unit, data_range=1.0, normalize="relu"
    )  # five scales, the standard betas and window
    assert ms_ssim(tile, noisy) == [pytest.approx(float(expected), abs=1e-5)]


def test_pair_metrics_reject_mismatched_or_float_images():
    with pytest.raises(ValueError, match="same shape|one shape"):
        ssim(np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 9, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        psnr(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))


def test_lpips_is_none_without_local_alexnet_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    tile = _smooth_tile(0, size=32)
    assert lpips(tile, tile) is None


def test_frechet_distance_matches_torchmetrics_and_the_1d_formula():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 8))
    fake = rng.normal(0.5, 1.5, size=(150, 8)) @ rng.normal(size=(8, 8))
    moments = [
        torch.from_numpy(m)
        for features in (real, fake)
        for m in (features.mean(0), np.cov(features, rowvar=False))
    ]
    assert frechet_distance(real, fake) == pytest.approx(float(_compute_fid(*moments)), rel=1e-6)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    # For 1-D Gaussians the distance is (mu1 - mu2)^2 + (sigma1 - sigma2)^2.
    x, y = rng.normal(2, 3, size=(50, 1)), rng.normal(-1, 0.5, size=(40, 1))
    by_hand = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert frechet_distance(x, y) == pytest.approx(by_hand)
    with pytest.raises(ValueError, match="one dimension"):
        frechet_distance(real, fake[:, :4])


def test_kernel_distance_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 3)), rng.normal(1.0, 1.0, size=(6, 3))

    def k(x, y):
        return (x @ y / 3 + 1) ** 3

    n = len(a)
    within = sum(k(a[i], a[j]) + k(b[i], b[j]) for i in range(n) for j in range(n) if i != j)
    across = sum(k(a[i], b[j]) for i in range(n) for j in range(n))
    by_hand = within / (n * (n - 1)) - 2 * across / n**2
    # Subsets as large as the sets hold every vector, so each subset gives the same value.
    mean, spread = kernel_distance(a, b, subsets=5, subset_size=100)
    assert mean == pytest.approx(by_hand)
    assert spread == pytest.approx(0.0, abs=1e-9)
    assert mean == pytest.approx(float(poly_mmd(torch.from_numpy(a), torch.from_numpy(b))))
    # Random subsets: about 0 for two samples of one distribution, clearly above for a shift.
    real = rng.normal(size=(300, 3))
    same = kernel_distance(real, rng.normal(size=(300, 3)), subset_size=50)
    shifted = kernel_distance(real, rng.normal(1.0, 1.0, size=(300, 3)), subset_size=50)
    assert abs(same[0]) < 0.1 < shifted[0] - 3 * shifted[1]
    assert kernel_distance(real, real[::-1], subset_size=50) == kernel_distance(
        real, real[::-1], subset_size=50
    )  # seeded


def test_kernel_distance_is_the_same_with_or_without_whole_kernels(monkeypatch):
    rng = np.random.default_rng(1)
    few, many = rng.normal(size=(40, 4)), rng.normal(0.5, 1.0, size=(300, 4))  # unequal sets
    held = kernel_distance(few, many, subsets=20, subset_size=30)
    monkeypatch.setattr(image_metrics, "KID_CACHED", 0)  # subset by subset instead
    assert kernel_distance(few, many, subsets=20, subset_size=30) == pytest.approx(held)


# ---------------------------------------------------------------- distribution


def test_kl_and_js_match_scipy():
    p, q = np.array([0.5, 0.3, 0.2]), np.array([2, 5, 3])  # counts are normalised
    assert kl_divergence(p, q) == pytest.approx(entropy(p, q / q.sum()), rel=1e-6)
    assert js_divergence(p, q) == pytest.approx(jensenshannon(p, q) ** 2)
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(math.log(2))  # its upper bound
    assert np.isfinite(kl_divergence([1, 1], [1, 0]))  # smoothed, so finite
    with pytest.raises(ValueError, match="same bins"):
        kl_divergence([1, 2], [1, 2, 3])


def test_histogram_divergences_per_dimension():
    # Dimension 0 bins (2 bins over [0, 1]) as 3:1 against 1:3; dimension 1 is identical.
    a = np.array([[0, 5], [0, 6], [0, 7], [1, 8]], dtype=float)
    b = np.array([[0, 5], [1, 6], [1, 7], [1, 8]], dtype=float)
    kl = 0.75 * math.log(3) + 0.25 * math.log(1 / 3)
    js = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert histogram_divergences(a, b, bins=2) == pytest.approx((kl / 2, js / 2))


def test_wasserstein_is_the_mean_of_per_dimension_distances():
    a = np.array([[0.0, 1.0], [1.0, 1.0]])
    b = np.array([[2.0, 1.0], [3.0, 1.0]])
    assert wasserstein(a, b) == pytest.approx(1.0)  # 2 in the first dimension, 0 in the second
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), rng.normal(1, 2, size=(40, 4))
    per_dimension = [wasserstein_distance(x[:, d], y[:, d]) for d in range(4)]
    assert wasserstein(x, y) == pytest.approx(np.mean(per_dimension))


def test_mmd_by_hand_and_on_samples():
    a, b = np.array([[0.0], [1.0]]), np.array([[0.0], [3.0]])
    # Kernel exp(-d^2 / 2) at bandwidth 1: within a exp(-1/2), within b exp(-9/2).
    across = (1 + math.exp(-4.5) + math.exp(-0.5) + math.exp(-2)) / 4
    by_hand = math.exp(-0.5) + math.exp(-4.5) - 2 * across
    assert mmd(a, b, bandwidth=1.0) == pytest.approx(by_hand)
    # Median heuristic: pooled distances 1, 0, 3, 1, 2, 3; the positive ones' median is 2.
    assert mmd(a, b) == pytest.approx(mmd(a, b, bandwidth=2.0))
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    assert abs(mmd(first, second)) < 0.01
    assert mmd(first, second + 1.0) > 0.1


def test_distribution_scores_gather_every_distance():
    rng = np.random.default_rng(0)
    real, generated = rng.normal(size=(100, 3)), rng.normal(0.5, 1.0, size=(80, 3))
    scores = distribution_scores(real, generated, bins=8)
    assert (scores.kl, scores.js) == pytest.approx(histogram_divergences(real, generated, bins=8))
    assert scores.wasserstein == pytest.approx(wasserstein(real, generated))
    assert scores.mmd == pytest.approx(mmd(real, generated))
    with pytest.raises(ValueError, match="at least two vectors"):
        distribution_scores(real[:1], generated)


# ---------------------------------------------------------------- classification


def test_imbalanced_classes_separate_accuracy_from_balanced_accuracy():
    truth = ["tumour"] * 6 + ["stroma", "normal"]
    predicted = ["tumour"] * 8  # always the majority class
    scores = classification_scores(truth, predicted)
    assert scores.count == 8
    assert scores.accuracy == pytest.approx(6 / 8)
    # Recall is 1 for tumour and 0 for the two others.
    assert scores.balanced_accuracy == pytest.approx(1 / 3)
    assert scores.balanced_accuracy == pytest.approx(balanced_accuracy_score(truth, predicted))
    tumour_f1 = 2 * (6 / 8) * 1 / (6 / 8 + 1)
    assert scores.macro_f1 == pytest.approx(tumour_f1 / 3)  # never-predicted classes count
    assert scores.per_class["tumour"] == pytest.approx(
        {"precision": 0.75, "recall": 1.0, "f1": tumour_f1, "support": 6.0}
    )
    assert scores.per_class["stroma"]["recall"] == 0.0
    assert scores.auc is None and scores.top_k == {}


def test_binary_auc_counts_correctly_ordered_pairs():
    truth = ["benign", "benign", "malignant", "malignant"]
    malignant = np.array([0.1, 0.4, 0.35, 0.8])
    scores = classification_scores(
        truth,
        ["benign", "benign", "benign", "malignant"],
        scores=np.stack([1 - malignant, malignant], axis=1),
        classes=["benign", "malignant"],
    )
    # Of the 4 (malignant, benign) pairs only 0.35 < 0.4 is out of order.
    assert scores.auc == pytest.approx(3 / 4)


def test_multiclass_auc_and_top_k_from_scores():
    classes = ["tumour", "stroma", "normal"]
    truth = ["tumour", "tumour", "stroma", "stroma"]  # "normal" never true
    scores = np.array(
        [
            [0.6, 0.3, 0.1],  # tumour: ranked 1st
            [0.2, 0.3, 0.5],  # tumour: ranked 3rd
            [0.3, 0.6, 0.1],  # stroma: ranked 1st
            [0.4, 0.35, 0.25],  # stroma: ranked 2nd
        ]
    )
    predicted = [classes[row.argmax()] for row in scores]
    result = classification_scores(truth, predicted, scores=scores, classes=classes, top_k=(1, 2))
    assert result.top_k == {1: pytest.approx(2 / 4), 2: pytest.approx(3 / 4)}
    # One-vs-rest over the classes present. Tumour scores: tumour 0.6, 0.2 against stroma
    # items 0.3, 0.4 -> 2 of 4 pairs in order; stroma: 0.6, 0.35 against 0.3, 0.3 -> 4 of 4.
    assert result.auc == pytest.approx((2 / 4 + 4 / 4) / 2)
    one_class = classification_scores(
        ["tumour"] * 2, ["tumour"] * 2, scores=scores[:2], classes=classes
    )
    assert one_class.auc is None
    with pytest.raises(ValueError, match="shape"):
        classification_scores(truth, predicted, scores=scores[:, :2], classes=classes)
    with pytest.raises(ValueError, match="at least one item"):
        classification_scores([], [])


def test_confusion_matrix_rows_are_truth():
    truth = ["a", "a", "b", "b", "b", "c"]
    predicted = ["a", "b", "b", "b", "c", "c"]
    assert confusion_matrix(truth, predicted, ["a", "b", "c"]) == [
        [1, 1, 0],
        [0, 2, 1],
        [0, 0, 1],
    ]


# ---------------------------------------------------------------- retrieval


def test_majority_vote_breaks_ties_by_summed_similarity():
    assert majority_vote(["a", "b", "b"], [0.9, 0.5, 0.4]) == "b"
    assert majority_vote(["b", "a", "a", "b"], [0.5, 0.9, 0.8, 0.4]) == "a"  # 2-2; 1.7 > 0.9
    with pytest.raises(ValueError, match="at least one label"):
        majority_vote([], [])


def test_leave_one_out_neighbours_and_knn():
    vectors = np.array([[1.0, 0.0], [0.8, 0.2], [0.0, 1.0], [0.3, 0.7], [2.0, 0.1]])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    indices, similarities = leave_one_out_neighbours(vectors, 2)
    assert indices.tolist() == [[4, 1], [4, 0], [3, 1], [2, 1], [0, 1]]
    assert similarities[0] == pytest.approx([unit[0] @ unit[4], unit[0] @ unit[1]])
    labels = ["x", "x", "y", "y", "x"]
    assert leave_one_out_knn(vectors, labels, k=1) == 1.0
    # With 3 neighbours, items 2 and 3 ("y") each see y, x, x and are outvoted.
    assert leave_one_out_knn(vectors, labels, k=3) == pytest.approx(3 / 5)


def test_knn_labels_classify_queries_against_a_labelled_bank():
    bank = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = ["x", "x", "y", "y"]
    queries = np.array([[0.8, 0.3], [0.2, 0.9], [1.0, 1.0]])
    assert knn_labels(queries, bank, labels, 1) == ["x", "y", "x"]  # a tie goes to the first
    assert knn_labels(queries, bank, labels, 3) == ["x", "y", "x"]
    # k past the bank's size takes all four: 2-2 votes, won by the larger summed similarity
    assert knn_labels(queries, bank, labels, 10) == ["x", "y", "x"]
    with pytest.raises(ValueError, match="labels"):
        knn_labels(queries, bank, labels[:3], 1)


def test_retrieval_scores_at_several_cutoffs():
    queries = ["a", "a", "a", "b"]
    ranked = [["a", "b", "b"], ["b", "a", "a"], ["b", "b", "a"], ["a", "b"]]
    similarities = [[0.9, 0.8, 0.7], [0.9, 0.8, 0.7], [0.9, 0.8, 0.7], [0.6, 0.5]]
    scores = retrieval_scores(queries, ranked, similarities, k=(1, 3))
    assert scores.count == 4 and scores.k == [1, 3]
    assert scores.accuracy_at_k == {1: 0.25, 3: 1.0}
    # Votes of the first 3: a b b -> b; b a a -> a; b b a -> b; a b -> a tie won by a (0.6).
    assert scores.majority_vote_at_k == {1: 0.25, 3: 0.25}
    # mMV@k: class a 1/3 at k=3, class b 0 -> (1/3 + 0) / 2; at k=1 a 1/3, b 0 too.
    assert scores.mean_majority_vote_at_k == pytest.approx({1: 1 / 6, 3: 1 / 6})
    beyond = retrieval_scores(["a"], [["b", "a"]], [[0.9, 0.8]], k=(5,))
    assert beyond.accuracy_at_k == {5: 1.0}
