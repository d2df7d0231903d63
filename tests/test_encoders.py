"""Patch encoders: the offline default's quality on real tiles, and every loading path."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histopilot.errors import EncoderError, ImageInputError
from histopilot.evals.metrics.retrieval import leave_one_out_knn
from histopilot.retrieval.encoders import OfflineEncoder, available_encoders, load_encoder
from histopilot.retrieval.encoders.offline import REFERENCE_FILE, fit_reference
from histopilot.slide import open_slide
from histopilot.slide.tiling import iter_tiles, tile_grid
from tests.tiny_encoders import save_tiny_hf_clip, save_tiny_open_clip, save_tiny_timm


@pytest.fixture(scope="module")
def crc_patches(test_data: Path) -> tuple[list[np.ndarray], list[str]]:
    folder = test_data / "patches" / "crc_val_he_7k"
    rows = list(csv.DictReader((folder / "labels.csv").open()))
    images = [np.asarray(Image.open(folder / row["file"]).convert("RGB")) for row in rows]
    return images, [row["label"] for row in rows]


def test_offline_encoder_tells_colorectal_tissue_classes_apart(crc_patches) -> None:
    images, labels = crc_patches
    vectors = OfflineEncoder().encode_images(images)
    one_nn = leave_one_out_knn(vectors, labels, k=1)
    three_nn = leave_one_out_knn(vectors, labels, k=3)
    print(
        f"offline encoder, 32 CRC-VAL-HE-7K patches, 8 classes: "
        f"1-NN {one_nn:.3f}, 3-NN {three_nn:.3f}"
    )
    assert one_nn >= 0.75  # chance is 0.125


def test_offline_vectors_are_unit_length_deterministic_and_size_tolerant(crc_patches) -> None:
    images, _ = crc_patches
    encoder = load_encoder("offline")
    first = encoder.encode_images(images[:3])
    again = encoder.encode_images(images[:3], batch_size=1)
    assert first.shape == (3, encoder.dim) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(first, again, atol=1e-5)
    rgba = np.dstack([images[0], np.full(images[0].shape[:2], 255, np.uint8)])
    np.testing.assert_allclose(encoder.encode_images([rgba]), first[:1], atol=1e-5)
    with_a_small_batch_mate = encoder.encode_images([images[0], images[1][:60, :50]])
    np.testing.assert_allclose(with_a_small_batch_mate[0], first[0], atol=1e-5)


def test_offline_encoder_refuses_what_is_not_a_tile() -> None:
    encoder = OfflineEncoder()
    with pytest.raises(ImageInputError, match="8-bit"):
        encoder.encode_images([np.zeros((64, 64, 3), np.float32)])
    with pytest.raises(ImageInputError, match="at least 8x8"):
        encoder.encode_images([np.zeros((4, 4, 3), np.uint8)])
    with pytest.raises(EncoderError, match="no text tower"):
        encoder.encode_text(["tumour"])


def test_shipped_reference_statistics_are_reproducible(wsi_dir: Path, tmp_path: Path) -> None:
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:
        grid = tile_grid(slide, mpp=OfflineEncoder.mpp, tile_size=224, min_tissue=0.5)
        batches = (batch.images for batch in iter_tiles(slide, grid))
        fitted = fit_reference(batches, tmp_path / "ref.json", source="test")
    shipped = Path(OfflineEncoder.__module__.replace(".", "/")).with_name(REFERENCE_FILE)
    ours = json.loads(fitted.read_text())["groups"]
    theirs = json.loads((Path(__file__).parents[1] / shipped).read_text())["groups"]
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name]["mean"], theirs[name]["mean"], atol=1e-4)


def test_open_clip_model_from_a_local_folder_embeds_images_and_text(tmp_path: Path) -> None:
    folder = save_tiny_open_clip(tmp_path / "clip")
    encoder = load_encoder(f"open_clip:local-dir:{folder}", device="cpu")
    assert encoder.has_text and encoder.dim == 32 and encoder.tile_size == 32
    images = encoder.encode_images([np.full((40, 50, 3), 200, np.uint8)])
    texts = encoder.encode_text(["tumour", "stroma"])
    assert images.shape == (1, 32) and texts.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)


def test_hugging_face_clip_model_from_a_local_folder(tmp_path: Path) -> None:
    folder = save_tiny_hf_clip(tmp_path / "plip-like")
    encoder = load_encoder(f"hf-clip:{folder}", device="cpu")
    assert encoder.has_text and encoder.dim == 24 and encoder.tile_size == 32
    images = encoder.encode_images([np.full((60, 40, 3), 90, np.uint8)] * 2)
    texts = encoder.encode_text(["tumour", "adipose tissue"])
    assert images.shape == (2, 24) and texts.shape == (2, 24)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)


def test_timm_backbone_from_a_local_folder(tmp_path: Path) -> None:
    folder = save_tiny_timm(tmp_path / "vit")
    encoder = load_encoder(f"timm:local-dir:{folder}", device="cpu")
    assert encoder.dim == 192 and not encoder.has_text
    assert encoder.encode_images([np.zeros((64, 64, 3), np.uint8)]).shape == (1, 192)


def test_unknown_and_unreachable_encoders_are_explained() -> None:
    assert {"offline", "quiltnet-b-32", "plip", "uni", "virchow2"} <= set(available_encoders())
    with pytest.raises(EncoderError, match="unknown encoder 'resnet-please'"):
        load_encoder("resnet-please")
    with pytest.raises(EncoderError, match="cannot load|local Hugging Face cache"):
        load_encoder("timm:local-dir:/nonexistent/folder")
    with pytest.raises(EncoderError, match="local Hugging Face cache|gated"):
        load_encoder("uni")  # the hub is offline in tests
