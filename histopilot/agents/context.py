"""Run-scoped dependencies of the graph: models, encoder, reference bank, knowledge, limits.

LangGraph passes these to every node as ``runtime.context``; they are never checkpointed. What
the nodes compute from a slide that is too big for state (tile embeddings, importance maps,
per-tile reference votes) lives in a :class:`SlideWorkspace`, rebuilt on demand from the
slide's path, so a thread resumed in another process recomputes (or reads from the embedding
cache) what it needs instead of finding it missing.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import platformdirs
from langgraph.runtime import Runtime
from pydantic import ValidationError

from histopilot.agents.audit import Provenance, provenance_of
from histopilot.agents.guardrails.material import Material, as_declared, estimate_material
from histopilot.agents.state import SlideRef
from histopilot.agents.triage import TriageMaps, triage_maps
from histopilot.config import AgentsConfig, HistopilotConfig, load_config
from histopilot.errors import ConfigError, RegionError
from histopilot.retrieval.encoders.base import PatchEncoder
from histopilot.retrieval.features import embed_slide, slide_id_of
from histopilot.retrieval.kb.store import KnowledgeBase
from histopilot.retrieval.patch_index import PatchIndex
from histopilot.retrieval.reference import ReferenceBank
from histopilot.slide import Slide, TissueMask, detect_tissue, open_slide

if TYPE_CHECKING:  # PyTorch loads only when a trained head is configured
    from histopilot.agents.mil import AttentionMIL

#: Whole-slide planes at a field's resolution are cached up to this size (48 MB of RGB)…
PLANE_MAX_PIXELS = 16_000_000
#: …and only below the scan's own resolution, where a direct read would decode more pixels.
PLANE_MIN_DOWNSAMPLE = 1.5


@dataclass
class SlideWorkspace:
    """One open slide and what triage computed for it."""

    slide: Slide
    tissue: TissueMask
    maps: TriageMaps
    material: Material  # as estimated from the slide; AgentContext.material adds the run's stain
    relevance: dict[str, np.ndarray] = field(default_factory=dict)  # target → per-tile
    planes: dict[float, tuple[np.ndarray, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def read(self, x: int, y: int, width: int, height: int, mpp: float | None) -> np.ndarray:
        """A level-0 box read at ``mpp`` µm/px (level 0 when unknown), one read at a time:
        parallel describe branches share the handle.

        When the whole slide at that resolution is small (a biopsy, a scan without a pyramid
        level near it), the slide is read once at that resolution and fields are cut from it:
        otherwise every low-power field of a single-level scan decodes millions of level-0
        pixels again.
        """
        slide_width, slide_height = self.slide.dimensions
        if (
            not (0 <= x <= slide_width - width and 0 <= y <= slide_height - height)
            or min(width, height) < 1
        ):
            raise RegionError(
                f"the box x={x}, y={y}, {width}×{height} is not inside the slide "
                f"({slide_width}×{slide_height} level-0 pixels)."
            )
        with self.lock:
            if mpp is None or self.slide.mpp is None:
                return self.slide.read_region(x, y, 0, width, height)
            downsample = mpp / self.slide.mpp.mean
            out_width = max(1, round(width / downsample))
            out_height = max(1, round(height / downsample))
            plane_pixels = slide_width * slide_height / downsample**2
            if downsample < PLANE_MIN_DOWNSAMPLE or plane_pixels > PLANE_MAX_PIXELS:
                return self.slide.read_region_at(x, y, out_width, out_height, downsample=downsample)
            if mpp not in self.planes:
                self.planes[mpp] = self.slide.overview(downsample=downsample)
            plane, scale = self.planes[mpp]
        left, top = round(x / scale), round(y / scale)
        crop = plane[top : top + out_height, left : left + out_width]
        if crop.shape[:2] != (out_height, out_width):
            # The plane's size is rounded up from the slide's; a box on the far edge can come
            # up a pixel short of the size a direct read would give.
            crop = cv2.resize(crop, (out_width, out_height), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(crop)

    def ref(self) -> SlideRef:
        width, height = self.slide.dimensions
        return SlideRef(
            path=str(self.slide.path),
            slide_id=slide_id_of(self.slide.path),
            mpp=self.slide.mpp.mean if self.slide.mpp else None,
            width=width,
            height=height,
        )


@dataclass
class AgentContext:
    """Everything a run needs besides its state. Build it with :meth:`from_config`."""

    settings: AgentsConfig
    models: dict[str, Any]
    encoder: PatchEncoder
    reference: ReferenceBank | None = None
    knowledge: KnowledgeBase | None = None
    patch_index: PatchIndex | None = None
    mil_head: AttentionMIL | None = None
    feature_cache: Path | None = None
    slide_mpp: float | None = None
    config: HistopilotConfig | None = field(default=None, repr=False)
    _provenance: Provenance | None = field(default=None, repr=False)
    _workspaces: dict[str, SlideWorkspace] = field(default_factory=dict, repr=False)
    _opening: dict[str, threading.Lock] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_config(
        cls,
        config: HistopilotConfig | None = None,
        *,
        slide_mpp: float | None = None,
        **overrides: Any,
    ) -> AgentContext:
        """Load what the configuration names; ``overrides`` replace ``[agents]`` settings."""
        from histopilot.retrieval.encoders import load_encoder
        from histopilot.serve.factory import chat_model

        config = config or load_config()
        settings = validated_settings(
            config.agents.model_dump() | {k: v for k, v in overrides.items() if v is not None}
        )
        roles = ("orchestrator", "describer", "diagnoser", "reporter")
        cache = settings.feature_cache or platformdirs.user_cache_dir("histopilot") + "/features"
        return cls(
            settings=settings,
            models={role: chat_model(role, config) for role in roles},
            encoder=load_encoder(config.encoders.patch),
            reference=ReferenceBank.open(settings.reference_bank)
            if settings.reference_bank
            else None,
            knowledge=KnowledgeBase.open(settings.knowledge_base)
            if settings.knowledge_base
            else None,
            patch_index=PatchIndex.open(settings.patch_index) if settings.patch_index else None,
            mil_head=_mil_head(settings.mil_head),
            feature_cache=Path(cache),
            slide_mpp=slide_mpp,
            config=config,
        )

    def with_settings(self, **overrides: Any) -> AgentContext:
        """This context with some ``[agents]`` settings replaced (validated the same way);
        models, encoder, resources and open slides are shared."""
        settings = validated_settings(self.settings.model_dump() | overrides)
        return replace(self, settings=settings, _provenance=None)

    def material(self, slide: SlideRef | str | Path) -> Material:
        """The slide's material for this run: what the slide shows, with this run's declared
        stain (``agents.stain``) on top."""
        return as_declared(self.workspace(slide).material, self.settings.stain)

    def provenance(self) -> Provenance:
        """What this context runs with, for the audit trail (computed once)."""
        if self._provenance is None:
            self._provenance = provenance_of(self)
        return self._provenance

    def workspace(self, slide: SlideRef | str | Path) -> SlideWorkspace:
        """The slide's workspace, opening the slide and running triage's maps on first use.

        Each slide has its own lock, so embedding one slide does not hold up work on another.
        """
        path = str(Path(slide.path if isinstance(slide, SlideRef) else slide).resolve())
        with self._lock:
            if path in self._workspaces:
                return self._workspaces[path]
            opening = self._opening.setdefault(path, threading.Lock())
        with opening:
            with self._lock:
                if path in self._workspaces:
                    return self._workspaces[path]
            workspace = self._open_workspace(Path(path))
            with self._lock:
                self._workspaces[path] = workspace
            return workspace

    def _open_workspace(self, path: Path) -> SlideWorkspace:
        opened = open_slide(path, mpp=self.slide_mpp)
        try:
            opened.require_brightfield("analysing a slide (H&E or IHC brightfield)")
            tissue = detect_tissue(opened)
            features = embed_slide(
                opened, self.encoder, cache_dir=self.feature_cache, tissue=tissue
            )
            maps = triage_maps(
                opened,
                features,
                self.encoder,
                mil_head=self.mil_head,
                reference=self.reference,
            )
            material = estimate_material(opened, tissue)
        except BaseException:
            opened.close()
            raise
        return SlideWorkspace(slide=opened, tissue=tissue, maps=maps, material=material)

    def release(self, slide: SlideRef | str | Path) -> None:
        """Close one slide's workspace, so a run over many slides holds one at a time."""
        path = str(Path(slide.path if isinstance(slide, SlideRef) else slide).resolve())
        with self._lock:
            workspace = self._workspaces.pop(path, None)
            self._opening.pop(path, None)
        if workspace is not None:
            workspace.slide.close()

    def close(self) -> None:
        """Close every slide the run opened."""
        with self._lock:
            for workspace in self._workspaces.values():
                workspace.slide.close()
            self._workspaces.clear()


def validated_settings(values: dict[str, Any]) -> AgentsConfig:
    """``[agents]`` settings from ``values``, or a :class:`ConfigError` listing what is wrong."""
    try:
        return AgentsConfig.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors()
        )
        raise ConfigError(f"invalid agent settings: {problems}") from None


def _mil_head(folder: str | None) -> AttentionMIL | None:
    if folder is None:
        return None
    from histopilot.agents.mil import load_mil_head

    return load_mil_head(folder)


@functools.cache
def default_context() -> AgentContext:
    """The context a graph falls back to when its caller passes none (LangGraph Studio and
    ``langgraph dev`` run the graph with only its input): loaded from the configuration once."""
    return AgentContext.from_config()


def context_of(runtime: Runtime[AgentContext]) -> AgentContext:
    return runtime.context if runtime.context is not None else default_context()
