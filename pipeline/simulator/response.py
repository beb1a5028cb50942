"""One chat request's reply as the simulator builds it: its headers (``Retry-After`` in the
forms servers send), its delay, and the bytes and action (write, stall, drop) it ends in."""

from __future__ import annotations

import email.utils
import math
from typing import TYPE_CHECKING

from .config import format_seconds
from .directives import WRITE, Reply, http_response

if TYPE_CHECKING:
    from .app import Simulator


class ChatResponse:
    """One chat request's reply as it is built: its headers, its delay, how it is sent."""

    def __init__(
        self,
        simulator: Simulator,
        headers: list[tuple[str, str]],
        roll: float,
        delay_ms: float,
        now: float,
        wall_time: float,
        keep_alive: bool,
    ) -> None:
        self.simulator = simulator
        self.headers = headers
        self.roll = roll
        self.delay_ms = delay_ms
        self.now = now
        self.wall_time = wall_time
        self.keep_alive = keep_alive

    def reply(
        self, status: int, payload: bytes, action: int = WRITE, outcome: str | None = None
    ) -> Reply:
        simulator = self.simulator
        if simulator.config.rate_limit_headers:
            self.headers.extend(simulator.rate_limit_headers(simulator.config, self.now))
        simulator.stats[outcome or ("ok" if status == 200 else str(status))] += 1
        data = http_response(status, payload, self.headers, keep_alive=self.keep_alive)
        return Reply(self.now + max(0.0, self.delay_ms) / 1000, action, data, not self.keep_alive)

    def retry_after(self, seconds: float, *, as_date: bool = False, round_up: bool = False) -> None:
        if as_date:
            # Rounded up: an HTTP date has whole seconds and must not promise too early.
            value = email.utils.formatdate(math.ceil(self.wall_time + seconds), usegmt=True)
            self.headers.append(("retry-after", value))
            return  # no retry-after-ms, which clients prefer, so the date form gets exercised
        value = str(max(1, math.ceil(seconds))) if round_up else format_seconds(seconds)
        self.headers.append(("retry-after", value))
        self.headers.append(("retry-after-ms", format_seconds(round(seconds * 1000, 3))))
