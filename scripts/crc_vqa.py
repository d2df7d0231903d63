"""Build the tissue-class VQA set on which docs/evaluation.md scores the offline baseline.

Of each class of the 32 CRC-VAL-HE-7K patches, the first two become a labelled reference bank
and the other two are asked four questions each (see ``tests/crc_patches.vqa_questions``):

    python scripts/crc_vqa.py ../shared/data/patches/crc_val_he_7k vqa/
    histopilot eval vqa --data vqa/questions.jsonl --reference vqa/bank
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histopilot.retrieval.encoders import load_encoder
from histopilot.retrieval.patch_index import PatchIndex
from histopilot.retrieval.reference import add_labelled_images, read_labels
from tests.crc_patches import split_by_patch, vqa_questions


def build(patches: Path, out: Path, encoder_name: str = "offline") -> tuple[Path, Path]:
    """(questions.jsonl, bank folder) under ``out``, with the questioned patches copied
    beside the questions."""
    images = read_labels(patches, None)
    rows = [{"file": i.path.name, "label": i.label} for i in images]
    names = {image.label: image.name or image.label for image in images}
    banked, asked = split_by_patch(rows)
    out.mkdir(parents=True, exist_ok=True)
    for row in asked:
        shutil.copy(patches / row["file"], out / row["file"])
    questions = out / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in vqa_questions(asked, names)))
    encoder = load_encoder(encoder_name)
    bank = PatchIndex.create(out / "bank", encoder=encoder.name, dim=encoder.dim)
    keep = {row["file"] for row in banked}
    add_labelled_images(bank, encoder, [i for i in images if i.path.name in keep])
    return questions, out / "bank"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patches", type=Path, help="the crc_val_he_7k folder (with labels.csv)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--encoder", default="offline")
    options = parser.parse_args()
    questions, bank = build(options.patches, options.out, options.encoder)
    print(f"histopilot eval vqa --data {questions} --reference {bank}")


if __name__ == "__main__":
    main()
