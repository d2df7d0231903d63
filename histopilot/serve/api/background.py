"""Thread pools for agent work (chat turns, analyses) that yield the CPU to interactive requests.

An analysis is seconds of CPU; a tile is milliseconds. On Linux each worker thread lowers its
own scheduling priority (``nice`` +10), so while agents work the viewer's tiles still come
back quickly. Elsewhere the pools run at normal priority.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

BACKGROUND_NICENESS = 10


async def run_on(pool: ThreadPoolExecutor, work: Callable[[], T]) -> T:
    """``work()`` on ``pool``; the event loop waits without holding a thread of its own."""
    return await asyncio.wrap_future(pool.submit(work))


def background_pool(workers: int, name: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix=name, initializer=_lower_priority
    )


def _lower_priority() -> None:
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not permitted
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
