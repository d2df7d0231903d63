"""Expected training memory, printed before a recipe starts so a run that cannot fit fails
before it has spent an hour loading.

The estimate adds four parts: frozen weights (bf16, or 4-bit NF4 under QLoRA), trainable
weights with their gradients and AdamW moments, activations kept for the backward pass, and
a fixed allowance for the CUDA context and allocator. Activations follow the per-layer
accounting of Korthikanti et al. (2022, "Reducing Activation Recomputation in Large
Transformer Models") adapted to gated MLPs and memory-efficient attention: with gradient
checkpointing only each layer's input is kept, plus one layer being recomputed. The logits
are counted on their own because a 150k-token vocabulary makes them the largest single
tensor in a VLM's step. ``benchmarks/finetune_gpu.py`` compares the estimate with the peak
the GPU reports.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from pydantic import BaseModel
from torch import nn

GIB = 1024**3
#: NF4 with double quantisation: 4 bits per weight plus about 0.127 bits of scales.
NF4_BYTES = (4 + 0.127) / 8
#: LoRA weights kept in float32, their gradients, and AdamW's two moments (bytes per parameter).
TRAINABLE_BYTES = 4 + 4 + 8
CUDA_OVERHEAD_GIB = 1.0


class MemoryEstimate(BaseModel):
    weights_gib: float
    trainable_gib: float
    activations_gib: float
    overhead_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.trainable_gib + self.activations_gib + self.overhead_gib

    def line(self) -> str:
        return (
            f"expected memory ≈ {self.total_gib:.2f} GiB (weights {self.weights_gib:.2f}, "
            f"trainable + optimizer {self.trainable_gib:.2f}, activations "
            f"{self.activations_gib:.2f}, runtime {self.overhead_gib:.1f})"
        )


def lora_parameters(model: nn.Module, target_modules: str, rank: int) -> int:
    """Parameters LoRA adds: ``rank × (in + out)`` for every Linear whose name matches."""
    pattern = re.compile(target_modules)
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and pattern.fullmatch(name)
    )


def weight_bytes(
    model: nn.Module, *, dtype_bytes: int, quantized: Iterable[str] | None = None
) -> float:
    """Bytes of the frozen weights; Linear layers named in ``quantized`` count as NF4. A tied
    weight (embeddings shared with the output layer) is counted once."""
    quantized = set(quantized or ())
    total, seen = 0.0, set()
    for name, module in model.named_modules():
        for parameter in module.parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            nf4 = name in quantized and isinstance(module, nn.Linear) and parameter.ndim == 2
            total += parameter.numel() * (NF4_BYTES if nf4 else dtype_bytes)
    return total


def quantizable_linears(model: nn.Module, keep: list[str]) -> list[str]:
    """Linear layers bitsandbytes quantises when the modules matching ``keep`` stay whole
    (transformers' own matching rule, so the estimate follows what loading does)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and should_convert_module(name, keep)
    ]


def block_activation_bytes(
    *,
    tokens: int,
    hidden: int,
    intermediate: int,
    layers: int,
    checkpointing: bool,
    dtype_bytes: int = 2,
) -> float:
    """Bytes a stack of transformer blocks keeps for backward over ``tokens`` tokens (all
    sequences of a batch together)."""
    # Per token and layer: norms, q/k/v/o inputs and outputs (≈ 8 h), and the MLP's hidden
    # activations (≈ 4 i: gate, up, activation, product); memory-efficient attention kernels
    # do not store the score matrix.
    per_layer = tokens * (8 * hidden + 4 * intermediate) * dtype_bytes
    if checkpointing:
        return layers * tokens * hidden * dtype_bytes + per_layer
    return layers * per_layer


def logits_bytes(*, tokens: int, vocab: int, dtype_bytes: int = 2) -> float:
    """Logits in the compute dtype, their float32 copy for the loss, and its gradient."""
    return tokens * vocab * (dtype_bytes + 4 + 4)


def estimate(
    *,
    weights: float,
    trainable_parameters: int,
    activations: float,
    device: str,
    trainable_bytes: int = TRAINABLE_BYTES,
) -> MemoryEstimate:
    gpu = torch.device(device).type == "cuda"
    return MemoryEstimate(
        weights_gib=weights / GIB,
        trainable_gib=trainable_parameters * trainable_bytes / GIB,
        activations_gib=activations / GIB,
        overhead_gib=CUDA_OVERHEAD_GIB if gpu else 0.0,
    )
