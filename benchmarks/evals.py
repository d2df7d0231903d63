"""The evaluation harness against the field's reference implementations: same numbers, cost.

1. **FID and KID** on two feature sets (``--features`` × ``--dim``, Gaussian with shifted means
   and scales): ``histopilot.evals.metrics`` against torchmetrics' ``FrechetInceptionDistance``
   and ``KernelInceptionDistance`` fed the same features through an identity extractor (the
   peer). The values must agree; the ratio is torchmetrics' time over ours.
2. **Caption metrics** on TCGA reports (each against a copy whose first pT digit is moved on,
   the pairs of ``docs/evaluation.md``): ``text_scores`` (Python word tokens, then COCO's
   scorers) against the COCO toolkit's own pipeline (Stanford's PTB tokenizer on Java, then the
   same scorers), METEOR left out of both. The tokenisers differ, so the values differ a
   little; the ratio is the toolkit's time over ours.
3. **Retrieval evaluation**: leave-one-out MV@k over ``--vectors`` labelled vectors stored in a
   patch index (``evaluate_index``, what ``histopilot eval retrieval`` runs) against
   scikit-learn's brute-force cosine ``NearestNeighbors`` with the same majority vote. MV@k
   must agree; the ratio is scikit-learn's time over ours.

Needs ../shared/data or HISTOPILOT_TEST_DATA (for part 2) and Java (part 2's peer). About a
minute on 2 cores:

    python benchmarks/evals.py [--features 2000] [--dim 256] [--vectors 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histopilot.evals.card import Stopwatch
from histopilot.evals.metrics import (
    frechet_distance,
    kernel_distance,
    majority_vote,
    text_scores,
)
from histopilot.evals.retrieval import evaluate_index
from histopilot.retrieval.patch_index import PatchIndex, PatchRecord

DATA = Path(os.environ.get("HISTOPILOT_TEST_DATA", Path(__file__).parents[2] / "shared" / "data"))


class Identity(torch.nn.Module):
    """Hands features through, so torchmetrics' FID and KID score them as they are."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def timed(call):
    started = time.perf_counter()
    value = call()
    return value, time.perf_counter() - started


def fid_and_kid(count: int, dim: int) -> dict:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(0)
    real = rng.normal(0.0, 1.0, (count, dim))
    fake = rng.normal(0.2, 1.1, (count, dim))
    subset = min(1000, count)

    def peer_fid() -> float:
        metric = FrechetInceptionDistance(feature=Identity(dim))
        metric.update(torch.from_numpy(real), real=True)
        metric.update(torch.from_numpy(fake), real=False)
        return float(metric.compute())

    def peer_kid() -> float:
        torch.manual_seed(0)
        metric = KernelInceptionDistance(feature=Identity(dim), subset_size=subset, subsets=100)
        metric.update(torch.from_numpy(real), real=True)
        metric.update(torch.from_numpy(fake), real=False)
        return float(metric.compute()[0])

    ours_fid, ours_fid_s = timed(lambda: frechet_distance(fake, real))
    theirs_fid, theirs_fid_s = timed(peer_fid)
    (ours_kid, _), ours_kid_s = timed(lambda: kernel_distance(fake, real, subset_size=subset))
    theirs_kid, theirs_kid_s = timed(peer_kid)
    return {
        "fid": (ours_fid, theirs_fid, ours_fid_s, theirs_fid_s),
        "kid": (ours_kid, theirs_kid, ours_kid_s, theirs_kid_s),
    }


def caption_metrics(pairs: int) -> dict:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    reports = [
        json.loads(line)["text"]
        for line in (DATA / "reports" / "tcga_reports_gold_dev.jsonl").open(encoding="utf-8")
    ]
    references, candidates = [], []
    for text in reports:
        found = re.search(r"pT([1-3])", text)
        if found:
            references.append(text)
            candidates.append(
                text[: found.start(1)] + str(int(found.group(1)) + 1) + text[found.end(1) :]
            )
        if len(references) == pairs:
            break

    def coco() -> dict:
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({i: [{"caption": r}] for i, r in enumerate(references)})
        res = tokenizer.tokenize({i: [{"caption": c}] for i, c in enumerate(candidates)})
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
        return {"bleu_4": bleu[3], "rouge_l": float(rouge), "cider": float(cider)}

    ours, ours_s = timed(lambda: text_scores(candidates, [[r] for r in references], meteor=False))
    theirs, theirs_s = timed(coco)
    return {
        "pairs": len(references),
        "ours": {"bleu_4": ours.bleu_4, "rouge_l": ours.rouge_l, "cider": ours.cider},
        "theirs": theirs,
        "seconds": (ours_s, theirs_s),
    }


def retrieval(count: int, dim: int = 128, classes: int = 10, k: tuple[int, ...] = (1, 5)) -> dict:
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(1)
    centres = rng.normal(0, 1, (classes, dim))
    labels = rng.integers(0, classes, count)
    vectors = (centres[labels] + rng.normal(0, 3.0, (count, dim))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    names = [f"class-{label}" for label in labels]
    with tempfile.TemporaryDirectory() as scratch:
        index = PatchIndex.create(Path(scratch) / "index", encoder="synthetic", dim=dim)
        records = [
            PatchRecord(slide_id=f"p{i}", slide_path="-", x=0, y=0, size=1, label=name)
            for i, name in enumerate(names)
        ]
        index.add(vectors, records)
        ours, ours_s = timed(
            lambda: evaluate_index(
                index, level="patch", k=k, models=[], options={}, clock=Stopwatch()
            )
        )

    def peer() -> dict[int, float]:
        search = NearestNeighbors(n_neighbors=max(k) + 1, metric="cosine", algorithm="brute")
        distances, neighbours = search.fit(vectors).kneighbors(vectors)
        found = {}
        for depth in k:
            hits = 0
            for row in range(count):
                ranked = [j for j in neighbours[row] if j != row][:depth]
                similar = [
                    1 - d for j, d in zip(neighbours[row], distances[row], strict=True) if j != row
                ][:depth]
                hits += majority_vote([names[j] for j in ranked], similar) == names[row]
            found[depth] = hits / count
        return found

    theirs, theirs_s = timed(peer)
    return {
        "vectors": count,
        "ours": {depth: ours.scores["majority_vote_at_k"][depth] for depth in k},
        "theirs": theirs,
        "seconds": (ours_s, theirs_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--vectors", type=int, default=20000)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    results: dict = {}
    print(f"## FID and KID, {options.features} × {options.dim} features per set\n")
    print("| metric | histopilot | torchmetrics | histopilot s | torchmetrics s | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    results["fid_kid"] = fid_and_kid(options.features, options.dim)
    for name, (ours, theirs, ours_s, theirs_s) in results["fid_kid"].items():
        print(
            f"| {name} | {ours:.5f} | {theirs:.5f} | {ours_s:.3f} | {theirs_s:.3f} "
            f"| {theirs_s / ours_s:.2f} |"
        )

    if shutil.which("java") and (DATA / "reports").is_dir():
        captions = caption_metrics(options.pairs)
        results["captions"] = captions
        ours_s, theirs_s = captions["seconds"]
        print(f"\n## Caption metrics, {captions['pairs']} TCGA report pairs\n")
        print("| pipeline | BLEU-4 | ROUGE-L | CIDEr | seconds | ratio |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, scores, seconds in (
            ("histopilot (Python tokens)", captions["ours"], ours_s),
            ("COCO toolkit (PTB tokenizer)", captions["theirs"], theirs_s),
        ):
            print(
                f"| {name} | {scores['bleu_4']:.4f} | {scores['rouge_l']:.4f} "
                f"| {scores['cider']:.3f} | {seconds:.2f} | {theirs_s / seconds:.2f} |"
            )
    else:
        print("\n(caption metrics skipped: they need Java and ../shared/data)")

    found = retrieval(options.vectors)
    results["retrieval"] = found
    ours_s, theirs_s = found["seconds"]
    print(f"\n## Leave-one-out retrieval, {found['vectors']} vectors\n")
    print("| implementation | MV@1 | MV@5 | seconds | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(
        f"| histopilot (exact FAISS search) | {found['ours'][1]:.4f} | {found['ours'][5]:.4f} "
        f"| {ours_s:.2f} | {theirs_s / ours_s:.2f} |"
    )
    print(
        f"| scikit-learn NearestNeighbors | {found['theirs'][1]:.4f} "
        f"| {found['theirs'][5]:.4f} | {theirs_s:.2f} | 1.00 |"
    )
    if options.json:
        options.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
