"""Evaluation metrics: text, image, feature-distribution, classification and retrieval.

A leaf package: it imports nothing from the rest of ``histopilot``, so any layer (tools,
agents, the eval runners, benchmarks) can score its outputs with the same definitions.
Each module owns one kind of output:

- :mod:`.text`: answer matching (exact match, token F1) and caption metrics (BLEU, ROUGE-L,
  CIDEr, METEOR).
- :mod:`.image`: per-pair closeness (SSIM, MS-SSIM, PSNR, MAE, NRMSE, LPIPS) and distances
  between image feature sets (FID's Fréchet distance, KID).
- :mod:`.distribution`: divergences and distances between feature sets (KL, JS,
  Wasserstein, MMD).
- :mod:`.classification`: accuracy, balanced accuracy, macro-F1, AUC, top-k, confusion.
- :mod:`.retrieval`: top-k accuracy and majority-vote accuracy (MV@k, mMV@k) of rankings.
"""

from histopilot.evals.metrics.classification import (
    ClassificationScores,
    classification_scores,
    confusion_matrix,
)
from histopilot.evals.metrics.distribution import (
    DistributionScores,
    distribution_scores,
    histogram_divergences,
    js_divergence,
    kl_divergence,
    mmd,
    wasserstein,
)
from histopilot.evals.metrics.image import (
    ALEXNET_WEIGHTS,
    frechet_distance,
    kernel_distance,
    lpips,
    mae,
    ms_ssim,
    nrmse,
    psnr,
    ssim,
)
from histopilot.evals.metrics.retrieval import (
    RetrievalScores,
    knn_labels,
    leave_one_out_knn,
    leave_one_out_neighbours,
    majority_vote,
    retrieval_scores,
)
from histopilot.evals.metrics.text import (
    TextScores,
    exact_match,
    java_available,
    normalise_answer,
    text_scores,
    token_f1,
    tokens,
)

__all__ = [
    "ALEXNET_WEIGHTS",
    "ClassificationScores",
    "DistributionScores",
    "RetrievalScores",
    "TextScores",
    "classification_scores",
    "confusion_matrix",
    "distribution_scores",
    "exact_match",
    "frechet_distance",
    "histogram_divergences",
    "java_available",
    "js_divergence",
    "kernel_distance",
    "kl_divergence",
    "knn_labels",
    "leave_one_out_knn",
    "leave_one_out_neighbours",
    "lpips",
    "mae",
    "majority_vote",
    "mmd",
    "ms_ssim",
    "normalise_answer",
    "nrmse",
    "psnr",
    "retrieval_scores",
    "ssim",
    "text_scores",
    "token_f1",
    "tokens",
    "wasserstein",
]
