"""The slides a server may show: files under its configured roots, and nothing else.

A request names a slide by its id (a hash of its resolved path) or by its name under its root;
neither is ever joined onto a path. The catalog is built by walking the roots, and a file
whose resolved path leaves its root (a symlink pointing elsewhere) is not listed, so no
spelling of ``..``, no absolute path, no encoded separator and no link can reach a file
outside the roots: a key that is not in the catalog is simply an unknown slide.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from pydantic import BaseModel

from histopilot.errors import HistopilotError
from histopilot.slide import open_slide
from histopilot.slide.readers import SUPPORTED_EXTENSIONS

log = logging.getLogger(__name__)
#: A walk stops after this many files, so a root pointed at a huge tree cannot stall a request.
MAX_FILES_WALKED = 50_000
#: The listing is rebuilt (in the background) at most this often; an upload refreshes it.
RESCAN_SECONDS = 5.0
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
#: Formats whose pixels live in companion files the slide names: never accepted as uploads.
MULTI_FILE_EXTENSIONS = (".mrxs", ".vms", ".vmu")
UPLOAD_EXTENSIONS = [e for e in SUPPORTED_EXTENSIONS if e not in MULTI_FILE_EXTENSIONS]


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


@dataclass(frozen=True)
class _Index:
    """One scan's slides, sorted for listing and keyed for lookup."""

    listing: tuple[CatalogSlide, ...] = ()
    by_key: dict[str, CatalogSlide] = field(default_factory=dict)  # id and name
    by_file_name: dict[str, list[CatalogSlide]] = field(default_factory=dict)

    @classmethod
    def of(cls, slides: list[CatalogSlide]) -> _Index:
        listing = tuple(sorted(slides, key=lambda s: s.name.lower()))
        by_key: dict[str, CatalogSlide] = {}
        by_file_name: dict[str, list[CatalogSlide]] = {}
        for slide in listing:
            by_key.setdefault(slide.id, slide)
            by_key.setdefault(slide.name, slide)
            by_file_name.setdefault(slide.path.name, []).append(slide)
        return cls(listing, by_key, by_file_name)


class SlideCatalog:
    """The slides under ``roots`` and the upload folder, looked up by id or name.

    The first scan happens at start; later ones run on a background thread at most every
    :data:`RESCAN_SECONDS`, while requests keep using the previous listing, so a large or
    slow root never holds up a request. ``exclude`` (the server's data folder) is never listed,
    even when it sits inside a root.
    """

    def __init__(self, roots: list[Path], uploads: Path, *, exclude: Path | None = None) -> None:
        uploads.mkdir(parents=True, exist_ok=True)
        self.uploads = uploads.resolve()
        self.roots = [root.expanduser().resolve() for root in roots if root != uploads]
        missing = [str(root) for root in self.roots if not root.is_dir()]
        if missing:
            raise HistopilotError(f"slide folder(s) not found: {', '.join(missing)}.")
        self.roots.append(self.uploads)
        self.exclude = exclude.resolve() if exclude else None
        self._index = _Index.of(self._scan())
        self._scanned_at = time.monotonic()
        self._rescanning = threading.Lock()

    def slides(self) -> list[CatalogSlide]:
        self._refresh_in_background()
        return list(self._index.listing)

    def public(self, message: str) -> str:
        """``message`` with the server's folders taken out of any path it names, so errors
        about a slide name it as the listing does (``nested/a.svs``), never where it lives."""
        for folder in sorted(
            (*self.roots, *filter(None, [self.exclude])), key=lambda f: -len(str(f))
        ):
            message = message.replace(f"{folder}{os.sep}", "")
        return message

    def find(self, key: str) -> CatalogSlide:
        """The slide whose id or name is ``key``; a bare file name works when it is unique."""
        self._refresh_in_background()
        index = self._index
        if key in index.by_key:
            return index.by_key[key]
        named = index.by_file_name.get(key, [])
        if len(named) == 1:
            return named[0]
        if named:
            raise UnknownSlideError(
                f"{len(named)} slides are named {key!r}; use the slide's id from GET /v1/slides."
            )
        raise UnknownSlideError(
            f"no slide {key!r} on this server; GET /v1/slides lists the slides it serves."
        )

    def refresh(self) -> None:
        """Scan the roots now (blocking)."""
        with self._rescanning:
            self._index = _Index.of(self._scan())
            self._scanned_at = time.monotonic()

    def _refresh_in_background(self) -> None:
        if time.monotonic() - self._scanned_at < RESCAN_SECONDS or self._rescanning.locked():
            return
        self._scanned_at = time.monotonic()  # one rescan at a time, however many requests
        threading.Thread(target=self.refresh, name="slide-scan", daemon=True).start()

    async def add_upload(
        self, chunks: AsyncIterator[bytes], filename: str, max_bytes: int
    ) -> CatalogSlide:
        """Store an uploaded slide under a name of its content's hash and check it opens.

        The client's file name only contributes its (sanitised) last part; a file that is too
        large, is not a single-file slide format, or does not open is removed again.
        """
        base = _UNSAFE_NAME.sub("_", Path(filename.replace("\\", "/")).name).strip("._")
        if not base or not is_slide_file(base) or _is_multi_file(base):
            raise UnsupportedUploadError(
                f"{filename!r} is not an uploadable slide file; upload one of "
                f"{', '.join(UPLOAD_EXTENSIONS)} (formats spread over several files, such as "
                "MIRAX and VMS, must be placed in a slide folder by an administrator)."
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
        await anyio.to_thread.run_sync(self.refresh)
        return self.find(slide_id(final.resolve()))

    def _scan(self) -> list[CatalogSlide]:
        """Walk the roots (no links followed, hidden entries skipped, at most
        :data:`MAX_FILES_WALKED` files) and keep the slide files that resolve inside them."""
        found: dict[str, CatalogSlide] = {}
        walked = 0
        for root in self.roots:
            for folder, subfolders, files in os.walk(root):
                here = Path(folder)
                subfolders[:] = sorted(
                    name
                    for name in subfolders
                    if not name.startswith(".") and (here / name).resolve() != self.exclude
                )
                for name in sorted(files):
                    walked += 1
                    if walked > MAX_FILES_WALKED:
                        log.warning("slide folders hold more than %d files", MAX_FILES_WALKED)
                        return list(found.values())
                    if name.startswith(".") or not is_slide_file(name):
                        continue
                    entry = _entry(root, here / name)
                    if entry is not None:
                        found.setdefault(entry.id, entry)
        return list(found.values())


def _entry(root: Path, path: Path) -> CatalogSlide | None:
    try:
        resolved = path.resolve(strict=True)
        stat = resolved.stat()
    except (OSError, RuntimeError):
        return None  # a dangling or looping link
    if not resolved.is_relative_to(root) or not resolved.is_file():
        return None  # a link that leaves its root is never served
    return CatalogSlide(
        id=slide_id(resolved),
        name=path.relative_to(root).as_posix(),
        path=resolved,
        size_bytes=stat.st_size,
        modified_ns=stat.st_mtime_ns,
    )


def _is_multi_file(name: str) -> bool:
    return name.lower().endswith(MULTI_FILE_EXTENSIONS)


def _check_opens(path: Path, name: str) -> None:
    try:
        with open_slide(path) as slide:
            _ = slide.dimensions
    except HistopilotError as error:
        raise UnsupportedUploadError(
            f"{name} is not a slide histopilot can open: {str(error).replace(str(path), name)}"
        ) from None
