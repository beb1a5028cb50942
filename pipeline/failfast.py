"""The setup check of the online executor: a run whose first requests all fail the same way
because of its setup stops, instead of writing every row as an error.

A wrong --base-url path, a host that does not resolve, a refused port, a server that answers
500 to everything: ``FailFast.limit`` such attempts in a row, no answer yet, one kind and
status. Only failures that say "this address or server is wrong" count (not 429s: rate
control; not timeouts: a cold start; not 400s: the rows' own content). The first answer
disarms it for the rest of the run. While it is armed, error results like the ones counted
wait ("probation"): if the run stops they stay pending, so a rerun after the fix sends them.
"""

from __future__ import annotations

from .asks import Results
from .errors import ConnectFailed, FatalError, RequestError
from .progress import Reporter
from .records import RowResult
from .stopping import Stop, StopKind


class FailFast:
    """Sits between the executor and the recorder (see the module docstring)."""

    limit = 10

    def __init__(self, results: Results, stop: Stop, reporter: Reporter, base_url: str) -> None:
        self.results = results
        self.stop = stop
        self.reporter = reporter
        self.base_url = base_url
        self.armed = True
        self.failures = 0
        self.signature: tuple[str, int | None] | None = None
        self.tripped: tuple[str, int | None] | None = None  # the signature that stopped the run
        self._held: list[RowResult] = []

    @staticmethod
    def counts(exc: RequestError) -> bool:
        if isinstance(exc, ConnectFailed):
            return True
        return exc.status in (404, 405, 500, 501, 505) and not isinstance(exc, FatalError)

    def record(self, result: RowResult) -> None:
        """Pass ``result`` on, unless it waits for the verdict or failed like the stop."""
        if self.signature is not None and result.status == "error":
            failure = (result.error_type, result.http_status)
            if self.armed and failure == self.signature:
                self._held.append(result)
                return
            if self.tripped == failure:
                return  # failed like every request before the stop: stays pending
        self.results.record(result)

    def failed(self, exc: RequestError) -> None:
        """Count one failed attempt; stop the run at the limit."""
        if not self.armed:
            return
        if not self.counts(exc):
            return
        signature = (exc.kind, exc.status)
        if self.signature is not None and signature != self.signature:
            self.release()  # two kinds of setup failure: rows fail, not the setup
            return
        self.signature = signature
        self.failures += 1
        if self.failures >= self.limit:
            self._trip(exc)

    def answered(self) -> None:
        """A 2xx came back: the setup works, the held errors are ordinary row results."""
        if self.armed:
            self.release()

    def release(self) -> None:
        """Disarm; what was held is recorded (also at the end of a run that did not stop)."""
        self.armed = False
        held, self._held = self._held, []
        for result in held:
            self.record(result)

    def _trip(self, exc: RequestError) -> None:
        """Every request so far failed the same way: stop, leaving those rows pending."""
        self.armed = False
        self.tripped = self.signature
        self._held = []
        status = f" {exc.status}" if exc.status else ""
        message = (
            f"the first {self.failures} requests all failed the same way and none "
            f"succeeded ({exc.kind}{status}: {exc.message}); check --base-url "
            f"({self.base_url}), the network, the proxy and the server; those rows "
            "stay pending"
        )
        self.reporter.error(f"stopping the run: {message}", http_status=exc.status)
        self.stop.request(StopKind.FATAL, f"failing: {message}", hard=True)
