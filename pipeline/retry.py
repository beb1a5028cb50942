"""The retry policy, as composed tenacity objects built from the config.

Retried: ``RetryableError`` (429 rate limits, 408/409/5xx, transport failures, malformed 200s).
The wait is the server's ``retry-after-ms`` / ``Retry-After`` when the error carried one
(capped at ``max_retry_wait``), else exponential backoff with jitter, capped. ``RowError`` and
``FatalError`` pass straight through: the caller ends the row or stops the run.

The first attempt runs outside tenacity: most rows succeed at once, and building a retry
state per row would be pure overhead on the hot path.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.wait import wait_base

from .errors import RequestError, RetryableError

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
OnRetry = Callable[[RequestError, int, float], None]


class wait_retry_after(wait_base):
    """Wait what the server asked for when the last error says so, else ``fallback``."""

    def __init__(self, fallback: wait_base, cap: float) -> None:
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hinted = getattr(exc, "retry_after", None)
        if hinted is not None:
            return float(min(hinted, self.cap))
        return float(self.fallback(retry_state))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many times and how long to retry one row.

    ``max_retries`` is the number of retries after the first attempt; backoff starts at
    ``initial`` seconds, doubles, gets up to ``jitter`` seconds of random jitter and is capped
    at ``max_backoff``; a server hint is capped at ``max_retry_wait``.
    """

    max_retries: int = 5
    initial: float = 0.5
    max_backoff: float = 30.0
    # enough to spread rows that failed together; more would only lengthen the run's tail
    jitter: float = 0.25
    max_retry_wait: float = 120.0
    sleep: Sleep = asyncio.sleep
    on_retry: OnRetry | None = None

    def retrying(self, on_retry: OnRetry | None = None) -> AsyncRetrying:
        """A fresh tenacity controller for the retries of one row."""
        notify = on_retry or self.on_retry

        def before_sleep(state: RetryCallState) -> None:
            if notify is None or state.outcome is None or state.next_action is None:
                return
            exc = state.outcome.exception()
            if isinstance(exc, RequestError):
                # +1: the first attempt ran outside tenacity
                notify(exc, state.attempt_number + 1, state.next_action.sleep)

        return AsyncRetrying(
            retry=retry_if_exception_type(RetryableError),
            stop=stop_after_attempt(self.max_retries),
            wait=wait_retry_after(
                # the first retry's wait is first_wait(); these continue the doubling
                wait_exponential_jitter(
                    initial=self.initial * 2, max=self.max_backoff, jitter=self.jitter
                ),
                cap=self.max_retry_wait,
            ),
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )

    def first_wait(self, error: RequestError) -> float:
        """The wait before the first retry (the attempt that failed ran outside tenacity)."""
        if error.retry_after is not None:
            return min(error.retry_after, self.max_retry_wait)
        return min(self.initial + random.uniform(0, self.jitter), self.max_backoff)

    async def call(
        self, attempt: Callable[[], Awaitable[T]], on_retry: OnRetry | None = None
    ) -> tuple[T, int]:
        """Run ``attempt`` with retries; returns (result, attempts made).

        ``on_retry`` (else the policy's own) hears of each retry before its wait. Raises the
        last ``RequestError``, its ``attempts`` field set, when it gives up.
        """
        notify = on_retry or self.on_retry
        try:
            return await attempt(), 1
        except RetryableError as exc:
            if self.max_retries == 0:
                exc.attempts = 1
                raise
            first_error = exc
        except RequestError as exc:
            exc.attempts = 1
            raise
        wait = self.first_wait(first_error)
        if notify is not None:
            notify(first_error, 1, wait)
        await self.sleep(wait)
        attempts = 1
        try:
            async for trial in self.retrying(notify):
                with trial:
                    attempts += 1
                    result = await attempt()
        except RequestError as exc:
            exc.attempts = attempts
            raise
        return result, attempts
