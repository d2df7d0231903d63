"""Slides: list, upload, info, thumbnail, tissue outline, triage importance, Deep Zoom tiles."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request, Response, UploadFile
from pydantic import BaseModel

from histopilot.serve.api.catalog import CatalogSlide, SlideSummary
from histopilot.serve.api.state import ServerState, State, User
from histopilot.serve.api.tiles import TileRequestError, heatmap_png

router = APIRouter(prefix="/v1/slides", tags=["slides"])
#: Browsers may keep tiles a day; ``private`` keeps shared caches (proxies) from storing them.
CACHE_CONTROL = "private, max-age=86400"
UPLOAD_CHUNK = 1 << 20
_TILE_NAME = re.compile(r"(\d{1,6})_(\d{1,6})\.(jpeg|jpg|png)")


class SlideList(BaseModel):
    data: list[SlideSummary]


class Importance(BaseModel):
    """Triage's importance per tile: an RGBA image (one pixel per tile, transparent where
    there is no tissue) covering ``columns × tile_size`` by ``rows × tile_size`` level-0
    pixels from the slide's top-left corner."""

    tile_size: int
    columns: int
    rows: int
    method: str
    image: str  # a data: URL of the PNG


def summary(slide: CatalogSlide) -> SlideSummary:
    return SlideSummary(id=slide.id, name=slide.name, size_bytes=slide.size_bytes)


@router.get("")
def list_slides(state: State, _user: User) -> SlideList:
    return SlideList(data=[summary(slide) for slide in state.catalog.slides()])


@router.post("", status_code=201)
async def upload_slide(file: UploadFile, state: State, _user: User) -> SlideSummary:
    """Upload a slide (multipart field ``file``); up to ``server.max_upload_mb``."""

    async def chunks():
        while chunk := await file.read(UPLOAD_CHUNK):
            yield chunk

    limit = int(state.config.server.max_upload_mb * 1e6)
    entry = await state.catalog.add_upload(chunks(), file.filename or "", limit)
    return summary(entry)


@router.get("/{slide_id}")
async def slide_info(slide_id: str, state: State, _user: User) -> dict[str, Any]:
    """Geometry, resolution, levels and scanner metadata (never the server's file path)."""
    entry = state.catalog.find(slide_id)
    info = await state.tiles.run(lambda: state.tiles.info(entry))
    return {"id": entry.id, **info.model_dump(mode="json", exclude={"path"}), "name": entry.name}


@router.get("/{slide_id}/thumbnail", response_class=Response)
async def thumbnail(
    slide_id: str,
    request: Request,
    state: State,
    _user: User,
    size: Annotated[int, Query(ge=16, le=2048)] = 512,
) -> Response:
    entry = state.catalog.find(slide_id)
    return await _cached_image(
        request, state, f"{entry.version}-thumb-{size}", lambda: state.tiles.thumbnail(entry, size)
    )


@router.get("/{slide_id}/dzi", response_class=Response)
async def deep_zoom_descriptor(slide_id: str, state: State, _user: User) -> Response:
    """The Deep Zoom descriptor; tiles are at ``dzi_files/{level}/{column}_{row}.{format}``."""
    entry = state.catalog.find(slide_id)
    xml = await state.tiles.run(lambda: state.tiles.dzi(entry))
    return Response(xml, media_type="application/xml", headers={"Cache-Control": CACHE_CONTROL})


@router.get("/{slide_id}/dzi_files/{level}/{tile}", response_class=Response)
async def deep_zoom_tile(
    slide_id: str, level: int, tile: str, request: Request, state: State, _user: User
) -> Response:
    entry = state.catalog.find(slide_id)
    match = _TILE_NAME.fullmatch(tile)
    suffix = state.tiles.tile_format
    if match is None or match.group(3).replace("jpg", "jpeg") != suffix:
        raise TileRequestError(f"{tile!r} is not a tile name; tiles are named COLUMN_ROW.{suffix}.")
    column, row = int(match.group(1)), int(match.group(2))
    return await _cached_image(
        request,
        state,
        f"{entry.version}-{level}-{column}-{row}",
        lambda: state.tiles.tile(entry, level, column, row),
    )


@router.get("/{slide_id}/tissue")
async def tissue_outline(slide_id: str, state: State, _user: User) -> dict[str, Any]:
    """Tissue polygons (pen marks excluded) as GeoJSON in level-0 pixels."""
    entry = state.catalog.find(slide_id)
    return await state.tiles.run(lambda: state.tiles.tissue(entry))


@router.get("/{slide_id}/importance")
async def importance(slide_id: str, state: State, _user: User) -> Importance:
    """Triage's importance map, as the navigator sees it (computed once per slide)."""
    entry = state.catalog.find(slide_id)

    def compute() -> Importance:
        maps = state.context.workspace(entry.path).maps
        rows, columns = maps.grid_shape
        grid = np.full((rows, columns), np.nan, np.float32)
        if len(maps.cells):
            grid[maps.cells[:, 1], maps.cells[:, 0]] = maps.importance
        encoded = base64.b64encode(heatmap_png(grid)).decode()
        return Importance(
            tile_size=maps.tile_size,
            columns=columns,
            rows=rows,
            method=maps.method,
            image=f"data:image/png;base64,{encoded}",
        )

    return await state.agent_work(compute)


async def _cached_image(
    request: Request, state: ServerState, tag: str, produce: Callable[[], bytes]
) -> Response:
    etag = f'"{tag}"'
    headers = {"Cache-Control": CACHE_CONTROL, "ETag": etag, "Vary": "Authorization"}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    body = await state.tiles.run(produce)
    return Response(body, media_type=state.tiles.media_type, headers=headers)
