"""Patch encoders: one contract (``PatchEncoder``), an offline default and a registry by name."""

from histopilot.retrieval.encoders.base import PatchEncoder
from histopilot.retrieval.encoders.offline import OfflineEncoder
from histopilot.retrieval.encoders.registry import available_encoders, load_encoder

__all__ = ["OfflineEncoder", "PatchEncoder", "available_encoders", "load_encoder"]
