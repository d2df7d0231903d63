"""Generated tiles (stain transfer, counterfactuals) against their sources and their target.

Three questions, three groups of scores:

* **Did the structure survive?** SSIM, MS-SSIM, PSNR, MAE, NRMSE (and LPIPS when its weights
  are local) between each generated tile and its source, the source resampled to the generated
  tile's size when they differ.
* **Does it look like the target?** FID and KID, plus KL, JS, Wasserstein and MMD, between the
  features of the generated tiles and of real tiles of the target, beside the same figures for
  the untouched sources, so a reader sees how far generation moved them. Features come from
  Inception-v3 (the standard FID network) when its weights are in the local torch hub cache and
  torch-fidelity is installed, and from the configured patch encoder otherwise; the two give
  different numbers, so the card and the notes name the one used.
* **Would an independent reader agree?** A k-NN classifier over labelled reference tiles (the
  same encoder; never the classifier that guided the generation) labels sources and outputs;
  the flip rate is the share of non-target sources whose output it reads as the target, and
  *class kept* the share whose class it reads the same before and after (what a stain
  transfer must keep).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch

from histopilot.errors import HistopilotError, TrainingDataError
from histopilot.evals.card import ModelRecord, Stopwatch, run_card
from histopilot.evals.metrics import (
    distribution_scores,
    frechet_distance,
    kernel_distance,
    knn_labels,
    lpips,
    mae,
    ms_ssim,
    nrmse,
    psnr,
    ssim,
)
from histopilot.evals.outputs import Evaluation, Figure, Series, Table, mean
from histopilot.evals.tables import read_rows
from histopilot.finetune.conversations import ConversionReport
from histopilot.retrieval.encoders.base import PatchEncoder
from histopilot.retrieval.reference import LabelledImage
from histopilot.retrieval.search import load_query_image
from histopilot.runcard import file_digest

#: torch-fidelity's port of the TensorFlow FID Inception (the network FID is defined on).
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
_MANIFESTS = {"stain.csv", "transfer.json", "counterfactuals.json"}
#: What the image tools measured themselves and write beside each tile: averaged into the
#: scores as recorded, so a tool's own figures are reproduced through the harness.
RECORDED = ("flipped", "oracle_flipped", "hematoxylin_ssim")


class Pair(NamedTuple):
    id: str
    source: Path
    output: Path
    recorded: dict[str, float]


class FeatureEncoder:
    """Images → feature vectors for FID/KID, named for the card."""

    def __init__(self, name: str, encode: Callable[[list[np.ndarray]], np.ndarray]) -> None:
        self.name, self.encode = name, encode


def feature_encoder(choice: str, patch: PatchEncoder) -> FeatureEncoder:
    """``inception``, ``patch`` or ``auto`` (Inception when it is available locally, else the
    patch encoder)."""
    weights = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    inception_ready = weights.is_file() and _torch_fidelity_installed()
    if choice == "inception" and not inception_ready:
        raise HistopilotError(
            f"FID on Inception needs torch-fidelity (pip install torch-fidelity) and its weights "
            f"at {weights} (histopilot never downloads them); use --features patch to compute "
            "FID on the configured patch encoder instead"
        )
    if choice in ("inception", "auto") and inception_ready:
        return _inception(weights)
    return FeatureEncoder(patch.name, patch.encode_images)


def _torch_fidelity_installed() -> bool:
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return False
    return True


def _inception(weights: Path) -> FeatureEncoder:
    from torchmetrics.image.fid import NoTrainInceptionV3

    network = NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=["2048"],
        feature_extractor_weights_path=str(weights),
    )

    def encode(images: list[np.ndarray]) -> np.ndarray:
        batches = []
        with torch.no_grad():
            for image in images:  # sizes may differ; the network resizes each to 299 px
                pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
                batches.append(network(pixels).reshape(1, -1).double().numpy())
        return np.concatenate(batches)

    return FeatureEncoder("inception-v3 (torch-fidelity FID weights)", encode)


def read_pairs(
    manifest: Path, columns: dict[str, str] | None = None
) -> tuple[list[Pair], ConversionReport]:
    """Image pairs from a stain, transfer or counterfactual manifest, or
    any table with ``source`` and ``output`` columns. Files are looked for beside the manifest
    first (``stain.csv`` names outputs relative to it), then as written (relative to the
    working folder, as the tool was given them)."""
    if manifest.name in _MANIFESTS - {"stain.csv"}:
        try:
            rows = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TrainingDataError(f"{manifest} is not a readable manifest: {error}") from error
        report = ConversionReport(source=str(manifest), format="json", read=len(rows))
        table = {str(i): row for i, row in enumerate(rows, 1) if isinstance(row, dict)}
    else:
        table, report = read_rows(
            manifest, ("source", "output"), columns, optional=("flag",), text_columns=("output",)
        )
    pairs = []
    for key, row in table.items():
        flag = str(row.get("flag") or "")
        output = _beside(manifest, str(row.get("output") or ""))
        source = _beside(manifest, str(row.get("source") or ""))
        if flag and not flag.startswith(("ok", "normalized")):
            report.skip(key, f"flagged by the tool: {flag}")
        elif output is None:
            report.skip(key, f"output not found: {row.get('output')!r}")
        elif source is None:
            report.skip(key, f"source is not an image file: {row.get('source')!r}")
        else:
            recorded = {
                name: float(row[name])
                for name in RECORDED
                if isinstance(row.get(name), bool | int | float)
            }
            pairs.append(Pair(key, source, output, recorded))
    report.kept = len(pairs)
    if not pairs:
        raise TrainingDataError(f"{manifest} names no usable pairs ({report.summary()})")
    return pairs, report


def _beside(manifest: Path, written: str) -> Path | None:
    if not written:
        return None
    for candidate in (manifest.parent / written, Path(written)):
        if candidate.is_file():
            return candidate
    return None


def evaluate_generation(
    manifest: Path,
    *,
    reference: list[LabelledImage] | None,
    target: str | None,
    features: FeatureEncoder | None,
    reader: FeatureEncoder | None,
    models: list[ModelRecord],
    options: dict[str, Any],
    columns: dict[str, str] | None = None,
    neighbours: int = 5,
) -> Evaluation:
    """Score the pairs of ``manifest``; with ``reference`` tiles, also realism (on
    ``features``) and the independent ``reader``'s verdicts (always a patch encoder, so that
    its flip rate does not change with the FID features)."""
    clock = Stopwatch()
    pairs, report = read_pairs(manifest, columns)
    pairs, sources, outputs = _loaded(pairs, report)
    closeness, notes = _closeness(sources, outputs)
    if report.skipped:
        notes.append(report.summary())
    items = [
        {"id": pair.id, "source": str(pair.source), "output": str(pair.output)}
        | {name: values[i] for name, values in closeness.items() if values is not None}
        | pair.recorded
        for i, pair in enumerate(pairs)
    ]
    recorded = {
        name: mean([pair.recorded.get(name) for pair in pairs])
        for name in RECORDED
        if any(name in pair.recorded for pair in pairs)
    }
    scores: dict[str, Any] = {
        "pairs": len(pairs),
        "features": features.name,
        **{name: mean(values) if values else None for name, values in closeness.items()},
        "recorded_by_tool": recorded,
    }
    tables = [
        Table(
            title="Closeness to the source (mean over pairs)",
            header=["SSIM", "MS-SSIM", "PSNR (dB)", "MAE", "NRMSE", "LPIPS"],
            rows=[[scores[n] for n in ("ssim", "ms_ssim", "psnr", "mae", "nrmse", "lpips")]],
        )
    ]
    if recorded:
        tables.append(
            Table(
                title="As the tool recorded them (mean over pairs)",
                header=list(recorded),
                rows=[list(recorded.values())],
            )
        )
    figures = [
        Figure(
            name="closeness",
            kind="bar",
            title="SSIM to the source, per tile",
            x_label="tile",
            y_label="SSIM",
            y_range=(0.0, 1.0),
            series=[Series(name="SSIM", x=[pair.id for pair in pairs], y=closeness["ssim"])],
        )
    ]
    if reference and features is not None and reader is not None:
        reference, overlap = _without_sources(reference, pairs)
        if overlap:
            notes.append(
                f"{overlap} reference tile(s) are also sources and were left out of the "
                "reference, so that no source is compared with itself"
            )
        realism, flips = _against_reference(
            features, reader, sources, outputs, reference, target, neighbours, items
        )
        if not flips:
            notes.append(
                "no independent reader: the reference (sources left out) holds one class; "
                "give labelled tiles of the sources' classes that are not themselves sources"
            )
        scores |= realism | flips
        tables += _reference_tables(realism, flips, features.name, target)
        notes.append(f"FID, KID and the distribution scores on {features.name} features")
        if min(len(pairs), realism["reference_tiles"]) <= realism["feature_dim"]:
            notes.append(
                f"FID over no more images than feature dimensions ({realism['feature_dim']}) "
                "is biased high: compare runs of the same size only"
            )
    return Evaluation(
        task="generation",
        scores=scores,
        notes=notes,
        tables=tables,
        figures=figures,
        items=items,
        card=run_card(
            "generation",
            clock,
            data=[manifest, *(path for pair in pairs for path in (pair.source, pair.output))],
            records=len(pairs),
            options=options,
            models=models,
        ),
    )


def _resized(source: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if source.shape == shape:
        return source
    return cv2.resize(source, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def _closeness(
    sources: list[np.ndarray], outputs: list[np.ndarray]
) -> tuple[dict[str, list[float] | None], list[str]]:
    """Per-pair pixel scores; pairs of different sizes are scored one at a time."""
    scores: dict[str, list[float] | None] = {}
    notes = []
    for name, metric in (("ssim", ssim), ("psnr", psnr), ("mae", mae), ("nrmse", nrmse)):
        scores[name] = [metric(s[None], o[None])[0] for s, o in zip(sources, outputs, strict=True)]
    try:
        scores["ms_ssim"] = [
            ms_ssim(s[None], o[None])[0] for s, o in zip(sources, outputs, strict=True)
        ]
    except ValueError as error:
        scores["ms_ssim"] = None
        notes.append(f"MS-SSIM skipped: {error}")
    perceptual = [lpips(s[None], o[None]) for s, o in zip(sources, outputs, strict=True)]
    if any(value is None for value in perceptual):
        scores["lpips"] = None
        notes.append("LPIPS skipped: the AlexNet weights are not in the local torch hub cache")
    else:
        scores["lpips"] = [value[0] for value in perceptual]
    return scores, notes


def _against_reference(features, reader, sources, outputs, reference, target, neighbours, items):
    """FID/KID and distribution scores against the target's real tiles, and the flip rate.

    Real tiles are resampled to the outputs' size when the outputs share one (the diffusion
    tools work at the model's size), so the features compare content, not resolution.
    """
    labels = [image.label for image in reference]
    shapes = {image.shape for image in outputs}
    real_tiles = [load_query_image(image.path) for image in reference]
    if len(shapes) == 1:
        real_tiles = [_resized(tile, next(iter(shapes))) for tile in real_tiles]
    encoded = {}
    for encoder in (features, reader):
        if encoder.name not in encoded:
            encoded[encoder.name] = [encoder.encode(x) for x in (real_tiles, outputs, sources)]
    real, made, original = encoded[features.name]
    wanted = real if target is None else real[[label == target for label in labels]]
    if len(wanted) < 2:
        raise TrainingDataError(
            f"the reference holds {len(wanted)} tile(s) of {target or 'the target'}; FID and "
            "KID need at least two"
        )
    realism: dict[str, Any] = {"reference_tiles": len(wanted), "feature_dim": real.shape[1]}
    for name, vectors in (("generated", made), ("source", original)):
        kid, kid_std = kernel_distance(vectors, wanted)
        spread = distribution_scores(vectors, wanted)
        realism[name] = {
            "fid": frechet_distance(vectors, wanted),
            "kid": kid,
            "kid_std": kid_std,
            **spread.model_dump(),
        }
    if len(set(labels)) < 2:
        return realism, {}  # a reader that knows one class would read everything as it
    bank, made, original = encoded[reader.name]
    before = knn_labels(original, bank, labels, neighbours)
    after = knn_labels(made, bank, labels, neighbours)
    for item, was, now in zip(items, before, after, strict=True):
        item |= {"source_class": was, "output_class": now}
    flips: dict[str, Any] = {
        "classifier": f"{neighbours}-NN on {reader.name} features over {len(reference)} "
        "labelled reference tiles",
        "class_kept": sum(was == now for was, now in zip(before, after, strict=True)) / len(before),
    }
    if target is not None:
        eligible = [now for was, now in zip(before, after, strict=True) if was != target]
        flips |= {
            "target": target,
            "flip_rate": sum(now == target for now in eligible) / len(eligible)
            if eligible
            else None,
            "flip_eligible": len(eligible),
        }
    return realism, flips


def _loaded(pairs: list[Pair], report: ConversionReport):
    """The pairs whose two images can be read, with their pixels (the source resampled to the
    output's size); an unreadable image skips its pair."""
    kept, sources, outputs = [], [], []
    for pair in pairs:
        try:
            source, output = load_query_image(pair.source), load_query_image(pair.output)
        except HistopilotError as error:
            report.skip(pair.id, f"unreadable image: {error}")
            continue
        kept.append(pair)
        sources.append(_resized(source, output.shape))
        outputs.append(output)
    report.kept = len(kept)
    if not kept:
        raise TrainingDataError(f"no pair's images could be read ({report.summary()})")
    return kept, sources, outputs


def _without_sources(reference: list[LabelledImage], pairs: list[Pair]):
    """The reference minus any tile whose bytes are a source's: a source among the reference
    would find itself and flatter both the realism and the reader."""
    sources = {file_digest([pair.source]) for pair in pairs}
    kept = [image for image in reference if file_digest([image.path]) not in sources]
    return kept, len(reference) - len(kept)


def _reference_tables(realism, flips, features: str, target: str | None) -> list[Table]:
    rows = [
        [
            name,
            realism[name]["fid"],
            realism[name]["kid"],
            realism[name]["kl"],
            realism[name]["js"],
            realism[name]["wasserstein"],
            realism[name]["mmd"],
        ]
        for name in ("source", "generated")
    ]
    tables = [
        Table(
            title=f"Against {realism['reference_tiles']} real tiles "
            f"{f'of {target}' if target else 'of the reference'} ({features} features)",
            header=["tiles", "FID", "KID", "KL", "JS", "Wasserstein", "MMD²"],
            rows=rows,
        )
    ]
    if flips:
        tables.append(
            Table(
                title=f"Independent classifier ({flips['classifier']})",
                header=["class kept", "target", "non-target sources", "flip rate"],
                rows=[
                    [
                        flips["class_kept"],
                        target,
                        flips.get("flip_eligible"),
                        flips.get("flip_rate"),
                    ]
                ],
            )
        )
    return tables
