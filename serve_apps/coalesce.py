"""Coalescing lookups: every request waiting on the database joins the next single query (`Coalesced`)."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from sqlalchemy.orm import Session

R = TypeVar("R")


class Coalesced(Generic[R]):
    """One query at a time for every key waiting: `await lookup(key)` joins the next query of `work`.

    While a query runs, new keys gather for the next one, so the database sees one query per wave of requests,
    not one per request; and a hung database ties up one connection, not all of them.
    """

    def __init__(self, read: Callable[..., Awaitable[dict[str, R]]],
                 work: Callable[[Session, list[str]], dict[str, R]]):
        self.read, self.work = read, work
        self.waiting: dict[str, list[asyncio.Future]] = {}
        self.running: asyncio.Task | None = None

    async def __call__(self, key: str, timeout_s: float | None = None) -> R:
        """The result for `key`; TimeoutError past `timeout_s` (the query goes on for the others)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # a waiter that timed out won't look
        self.waiting.setdefault(key, []).append(future)
        if self.running is None:
            self.running = loop.create_task(self._run())
        return await asyncio.wait_for(asyncio.shield(future), timeout_s)

    async def _run(self) -> None:
        try:
            while self.waiting:
                batch, self.waiting = self.waiting, {}
                try:
                    results = await self.read(self.work, list(batch))
                except Exception as exc:  # noqa: BLE001 (every waiter gets it: Unavailable, mostly)
                    for futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                for key, futures in batch.items():
                    for future in futures:
                        if not future.done():
                            future.set_result(results[key])
        finally:
            self.running = None
