"""The cost of diffusion sampling, inversion and counterfactuals on tiles.

1. **Sampling cost per tile per step** at 64 px with the recipe's default UNet (and the 32 px
   test model), batch 1 and 16: histopilot's DDIM loop against diffusers' own ``DDIMPipeline``
   on the same UNet and scheduler (the peer). The ratio shows what histopilot's loop adds.
2. **Edits**: DDIM inversion + regeneration and one counterfactual with classifier guidance
   (a gradient through the classifier at every step), seconds per tile.

Weights are random (costs do not depend on them). Run from the repository root:

    python benchmarks/diffusion.py [--device cpu] [--steps 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from diffusers import DDIMPipeline

from histopilot.finetune.diffusion import DataSpec, DiffusionRecipe, UNetSpec, build_model
from histopilot.tools.diffusion import Guide, TileClassifier, counterfactuals, reconstruct
from histopilot.tools.diffusion.sampling import generate, timesteps

MODELS = {
    "64 px, recipe default [32, 64, 64]": (64, UNetSpec()),
    "32 px, test model [16, 32]": (32, UNetSpec(block_out_channels=[16, 32])),
}
CLASSES = ["a", "b"]


def timed(function, repeats: int = 1) -> float:
    function()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def sampling(size: int, spec: UNetSpec, batch: int, steps: int, device: str) -> dict:
    recipe = DiffusionRecipe(data=DataSpec(images=Path()), out=Path(), image_size=size, model=spec)
    model = build_model(recipe, []).to(device)
    noise = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    schedule = timesteps(model, steps)

    def ours():
        with torch.no_grad():
            generate(model, noise.clone(), None, schedule)

    pipeline = DDIMPipeline(unet=model.unet, scheduler=model.scheduler)
    pipeline.set_progress_bar_config(disable=True)

    def peer():
        pipeline(batch_size=batch, num_inference_steps=steps, output_type="np", eta=0.0)

    ours_s, peer_s = timed(ours), timed(peer)
    return {
        "per_tile_per_step_ms": 1000 * ours_s / batch / steps,
        "diffusers_per_tile_per_step_ms": 1000 * peer_s / batch / steps,
        "ratio": peer_s / ours_s,
        "parameters": sum(p.numel() for p in model.unet.parameters()),
    }


def edits(size: int, spec: UNetSpec, steps: int, device: str) -> dict:
    recipe = DiffusionRecipe(data=DataSpec(images=Path()), out=Path(), image_size=size, model=spec)
    model = build_model(recipe, CLASSES).to(device)
    classifier = TileClassifier(CLASSES, image_size=size).eval()
    tiles = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    rebuild = timed(lambda: reconstruct(model, tiles, "a", steps=steps))
    guide = Guide(steps=steps, strength=0.6)
    explain = timed(
        lambda: counterfactuals(model, classifier, tiles, "b", guide=guide, source_condition="a")
    )
    return {
        "inversion_and_regeneration_s_per_tile": rebuild / len(tiles),
        "counterfactual_s_per_tile": explain / len(tiles),
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"torch threads: {torch.get_num_threads()}, CPUs: {os.cpu_count()}, device: {args.device}"
    )
    results = {}
    for name, (size, spec) in MODELS.items():
        for batch in (1, 16):
            key = f"{name}, batch {batch}"
            results[key] = sampling(size, spec, batch, args.steps, args.device)
            row = results[key]
            print(
                f"{key:48s} {row['per_tile_per_step_ms']:8.2f} ms/tile/step  "
                f"diffusers {row['diffusers_per_tile_per_step_ms']:8.2f}  "
                f"diffusers/histopilot time ratio {row['ratio']:.2f}"
            )
        results[f"{name}, edits"] = row = edits(size, spec, args.steps, args.device)
        print(
            f"{name + ', edits':48s} inversion+regeneration "
            f"{row['inversion_and_regeneration_s_per_tile']:.3f} s/tile, counterfactual "
            f"{row['counterfactual_s_per_tile']:.3f} s/tile ({args.steps} steps)"
        )
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
