"""Request batching of the embedder service: the texts of concurrent ``/embed`` requests are
merged into model calls of at most ``max_batch_size`` texts (a larger request runs alone), one
call at a time on one thread; while a call runs, the requests that arrive wait and form the next
call (no timer: an idle service answers a lone request at once). The runtime then runs each call
in length-sorted passes of ``forward_batch_size``. Copied into every embedder bento."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np


class MicroBatcher:
    def __init__(self, fn: Callable[[list[str]], np.ndarray], max_batch_size: int,
                 on_call: Callable[[int], None] | None = None) -> None:
        self.fn, self.max_batch = fn, max(1, int(max_batch_size))
        self.on_call = on_call
        self.queue: deque[tuple[list[str], asyncio.Future]] = deque()
        self.pool = cf.ThreadPoolExecutor(1, thread_name_prefix="maas-embed")
        self.task: asyncio.Task | None = None

    async def embed(self, texts: list[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self.queue.append((list(texts), future))
        if self.task is None or self.task.done():
            self.task = loop.create_task(self._drain())
        return await future

    def _next_call(self) -> list[tuple[list[str], asyncio.Future]]:
        taken, n = [], 0
        while self.queue and (not taken or n + len(self.queue[0][0]) <= self.max_batch):
            item = self.queue.popleft()
            taken.append(item)
            n += len(item[0])
        return taken

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self.queue:
            taken = self._next_call()
            merged = [t for texts, _ in taken for t in texts]
            try:
                out: Any = await loop.run_in_executor(self.pool, self.fn, merged)
            except Exception as exc:  # every request of the call gets the error
                for _, fut in taken:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            if self.on_call is not None:
                self.on_call(len(merged))
            start = 0
            for texts, fut in taken:
                if not fut.done():
                    fut.set_result(out[start:start + len(texts)])
                start += len(texts)
