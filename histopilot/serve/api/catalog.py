"""The slides a server may show: files under its configured roots, and nothing else.

A request names a slide by its id (a hash of its resolved path) or by its name under its root;
neither is ever joined onto a path. The catalog is built by walking the roots, and a file
whose resolved path leaves its root (a symlink pointing elsewhere) is not listed, so no
spelling of ``..``, no absolute path, no encoded separator and no link can reach a file
outside the roots: a key that is not in the catalog is simply an unknown slide.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
from pydantic import BaseModel

from histopilot.errors import HistopilotError
from histopilot.slide import open_slide
from histopilot.slide.readers import SUPPORTED_EXTENSIONS

#: A walk stops after this many files, so a root pointed at a huge tree cannot stall a request.
MAX_FILES_WALKED = 50_000
#: The listing is rebuilt at most this often; an upload refreshes it at once.
RESCAN_SECONDS = 5.0
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class UnknownSlideError(HistopilotError):
    """The server has no slide by that id or name."""


class UploadTooLargeError(HistopilotError):
    """An upload is larger than the server accepts."""


class UnsupportedUploadError(HistopilotError):
    """An upload's name or contents are not a slide histopilot reads."""


@dataclass(frozen=True)
class CatalogSlide:
    id: str
    name: str  # the path under its root, with '/' separators
    path: Path  # resolved
    size_bytes: int
    modified_ns: int

    @property
    def version(self) -> str:
        """Changes whenever the file does: the base of every cache validator."""
        return f"{self.id}-{self.modified_ns:x}-{self.size_bytes:x}"


class SlideSummary(BaseModel):
    """A slide as the listing shows it."""

    id: str
    name: str
    size_bytes: int


def slide_id(path: Path) -> str:
    return hashlib.sha256(str(path).encode()).hexdigest()[:16]


def is_slide_file(name: str) -> bool:
    lowered = name.lower()
    return any(lowered.endswith(extension) for extension in SUPPORTED_EXTENSIONS)


class SlideCatalog:
    """The slides under ``roots`` and the upload folder, looked up by id or name."""

    def __init__(self, roots: list[Path], uploads: Path) -> None:
        uploads.mkdir(parents=True, exist_ok=True)
        self.uploads = uploads.resolve()
        self.roots = [root.resolve() for root in roots if root != uploads] + [self.uploads]
        missing = [str(root) for root in self.roots if not root.is_dir()]
        if missing:
            raise HistopilotError(f"slide folder(s) not found: {', '.join(missing)}.")
        self._slides: dict[str, CatalogSlide] = {}
        self._scanned_at = float("-inf")
        self._lock = threading.Lock()

    def slides(self) -> list[CatalogSlide]:
        with self._lock:
            if time.monotonic() - self._scanned_at > RESCAN_SECONDS:
                self._slides = self._scan()
                self._scanned_at = time.monotonic()
            return sorted(self._slides.values(), key=lambda s: s.name.lower())

    def find(self, key: str) -> CatalogSlide:
        """The slide whose id or name is ``key``; a bare file name works when it is unique."""
        slides = self.slides()
        for slide in slides:
            if key in (slide.id, slide.name):
                return slide
        by_file_name = [s for s in slides if s.path.name == key]
        if len(by_file_name) == 1:
            return by_file_name[0]
        if len(by_file_name) > 1:
            raise UnknownSlideError(
                f"{len(by_file_name)} slides are named {key!r}; use the slide's id from "
                "GET /v1/slides."
            )
        raise UnknownSlideError(
            f"no slide {key!r} on this server; GET /v1/slides lists the slides it serves."
        )

    async def add_upload(
        self, chunks: AsyncIterator[bytes], filename: str, max_bytes: int
    ) -> CatalogSlide:
        """Store an uploaded slide under a name of its content's hash and check it opens.

        The client's file name only contributes its (sanitised) last part; a file that is too
        large, has a name histopilot does not read, or does not open is removed again.
        """
        base = _UNSAFE_NAME.sub("_", Path(filename.replace("\\", "/")).name).strip("._")
        if not base or not is_slide_file(base):
            raise UnsupportedUploadError(
                f"{filename!r} does not have a slide file extension; supported: "
                f"{', '.join(SUPPORTED_EXTENSIONS)}."
            )
        digest = hashlib.sha256()
        partial = self.uploads / f".upload-{uuid.uuid4().hex}"
        received = 0
        try:
            async with await anyio.open_file(partial, "wb") as handle:
                async for chunk in chunks:
                    received += len(chunk)
                    if received > max_bytes:
                        raise UploadTooLargeError(
                            f"the upload is larger than the server's limit of "
                            f"{max_bytes / 1e6:.0f} MB (server.max_upload_mb)."
                        )
                    digest.update(chunk)
                    await handle.write(chunk)
            if received == 0:
                raise UnsupportedUploadError("the upload is empty.")
            final = self.uploads / f"{digest.hexdigest()[:12]}-{base[-120:]}"
            await anyio.to_thread.run_sync(_check_opens, partial, base)
            partial.replace(final)
        finally:
            partial.unlink(missing_ok=True)
        with self._lock:
            self._scanned_at = float("-inf")
        return self.find(slide_id(final.resolve()))

    def _scan(self) -> dict[str, CatalogSlide]:
        found: dict[str, CatalogSlide] = {}
        walked = 0
        for root in self.roots:
            for path in sorted(root.rglob("*")):
                walked += 1
                if walked > MAX_FILES_WALKED:
                    return found
                relative = path.relative_to(root)
                if any(part.startswith(".") for part in relative.parts):
                    continue
                if not is_slide_file(path.name):
                    continue
                try:
                    resolved = path.resolve(strict=True)
                    stat = resolved.stat()
                except (OSError, RuntimeError):
                    continue  # a dangling or looping link
                if not resolved.is_relative_to(root) or not resolved.is_file():
                    continue  # a link that leaves its root is never served
                entry = CatalogSlide(
                    id=slide_id(resolved),
                    name=relative.as_posix(),
                    path=resolved,
                    size_bytes=stat.st_size,
                    modified_ns=stat.st_mtime_ns,
                )
                found.setdefault(entry.id, entry)
        return found


def _check_opens(path: Path, name: str) -> None:
    try:
        with open_slide(path) as slide:
            _ = slide.dimensions
    except HistopilotError as error:
        raise UnsupportedUploadError(
            f"{name} is not a slide histopilot can open: {str(error).replace(str(path), name)}"
        ) from None
