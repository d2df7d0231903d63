"""Images inside chat messages: one encoding for every backend.

Agents put slide regions into ``HumanMessage`` content as OpenAI ``image_url`` parts carrying a
base64 data URL. The OpenAI-compatible backend sends them as they are; the in-process backend
decodes them back into PIL images. Remote URLs are refused in-process: histopilot never fetches
from the network behind a user's back, and a slide region is always at hand as pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

import numpy as np
from PIL import Image

from histopilot.errors import HistopilotError

MAX_IMAGE_BYTES = 32 * 1024 * 1024
"""Largest encoded image accepted in a message (a 4096² PNG tile is about 30 MB)."""


def data_block(name: str, text: str) -> str:
    """``text`` fenced as data between ``<name>`` and ``</name>``, for a prompt that tells the
    model such blocks are never instructions. A tag of that name inside the text (which would
    end the block early, so what follows reads as the prompt's own words) is defused."""
    defused = re.sub(
        rf"<\s*(/?)\s*{re.escape(name)}\s*>", rf"‹\1{name}›", text, flags=re.IGNORECASE
    )
    return f"<{name}>\n{defused}\n</{name}>"


def image_part(image: Image.Image | np.ndarray, *, image_format: str = "jpeg") -> dict[str, Any]:
    """An OpenAI ``image_url`` content part holding ``image`` as a base64 data URL.

    JPEG (quality 95) is the default: regions come from JPEG- or JPEG 2000-compressed slides,
    and it keeps a 1024² region near 300 kB instead of the 2-3 MB of a PNG. Pass
    ``image_format="png"`` when every pixel matters.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image_format = image_format.lower()
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image_format must be 'jpeg' or 'png', not {image_format!r}")
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return {
        "type": "image_url",
        "image_url": {"url": f"data:image/{image_format};base64,{encoded}"},
    }


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image_url", "image")


def decode_image_part(part: dict[str, Any]) -> Image.Image:
    """The RGB image inside an ``image_url`` part or a LangChain standard ``image`` block."""
    if part.get("type") == "image" and "base64" in part:
        payload = part["base64"]
    else:
        url = part.get("image_url", part.get("url"))
        if isinstance(url, dict):
            url = url.get("url")
        if not isinstance(url, str) or not url.startswith("data:"):
            shown = url[:60] if isinstance(url, str) else type(url).__name__
            raise HistopilotError(
                f"images must be inline base64 data URLs (got {shown!r}); build them with "
                "histopilot.serve.image_part(image)"
            )
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise HistopilotError("image data URLs must be base64-encoded")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise HistopilotError(
            f"image in message is larger than {MAX_IMAGE_BYTES // 2**20} MB; send a smaller region"
        )
    try:
        data = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(data)) as opened:
            return opened.convert("RGB")
    except (binascii.Error, OSError, Image.DecompressionBombError) as error:
        raise HistopilotError(f"cannot decode image in message: {error}") from None
