"""The error tree of batch-prompt-pipeline.

Two families. *Run errors* stop a run and map to an exit code in the CLI. *Request errors*
end one attempt of one row; whether the attempt is retried, ends the row, or stops the
whole run is decided by the exception's type (set from the HTTP status and the error body's
``code``/``type`` when the response is parsed), never by matching text later on::

    PipelineError
    ├── UsageError                      exit 2: nothing was sent
    │   ├── ConfigError                 bad option, TOML, unknown key, missing API key
    │   ├── InputError                  missing column, bad template, malformed file, dup ids
    │   └── OutputError                 OUTPUT exists and is not ours, fingerprint mismatch
    │       └── FingerprintMismatch
    ├── LockHeld                        exit 8: another live run owns this OUTPUT
    ├── RunAborted                      exit 3-7: see EXIT_CODES; a rerun resumes
    └── RequestError                    one attempt of one row failed
        ├── RetryableError              retried with backoff
        │   ├── RateLimited             429 (not quota)
        │   ├── ServerError             408, 409, 5xx
        │   ├── TransportError          timeout, connection refused/reset/dropped
        │   │   └── ConnectFailed       no connection: refused, DNS, unreachable
        │   └── MalformedResponse       200 whose body is not a valid completion
        ├── RowError                    not retried: the row ends with this error
        │   ├── BadRequest              400 (incl. context length), 404, 422, other 4xx, 3xx
        │   ├── InvalidRow              the row's own data cannot make a request
        │   ├── ResponseTooLarge        body over --max-response-bytes (received or decoded)
        │   └── UnexpectedError         any other exception of one attempt (a parser's)
        └── FatalError                  not retried: the whole run stops at once
            ├── AuthenticationError     401
            ├── PermissionDenied        403 (AI/ML API: out of credits / spend limit)
            ├── QuotaExceeded           429 insufficient_quota
            ├── ServerSaysLater         429s in a row with Retry-After beyond --max-retry-wait
            ├── CertificateError        the server's TLS certificate fails verification
            └── BudgetReached           the next request could cross --max-cost / tokens
"""

from __future__ import annotations

# Exit codes of the CLI, one table (README "Exit codes" and `pipeline run --help` show it).
# Each code has one meaning a cron job can act on; the summary JSON carries the reason too.
EXIT_OK = 0
EXIT_FAILED_ROWS = 1
EXIT_USAGE = 2
EXIT_ABORTED = 3
EXIT_BUDGET = 4
EXIT_INTERRUPTED = 5
EXIT_STORAGE = 6
EXIT_RETRY_LATER = 7
EXIT_LOCKED = 8
EXIT_BATCHES_RUNNING = 9

EXIT_CODES: dict[int, tuple[str, str]] = {
    EXIT_OK: ("ok", "every row is ok or skipped"),
    EXIT_FAILED_ROWS: ("failed_rows", "the run finished, but some rows failed (error or invalid)"),
    EXIT_USAGE: ("usage", "usage, config or input error: nothing was sent; fix the command"),
    EXIT_ABORTED: (
        "fatal",
        "stopped by an error every row would hit: 401 bad key, 403 no credits, "
        "insufficient_quota, or every request failing the same way; fix it, then rerun",
    ),
    EXIT_BUDGET: ("budget", "budget reached (--max-cost, --max-total-tokens); rerun with more"),
    EXIT_INTERRUPTED: (
        "interrupted",
        "stopped on purpose: SIGTERM/SIGINT or --max-runtime; rerun the same command to go on",
    ),
    EXIT_STORAGE: (
        "storage",
        "the checkpoint or OUTPUT could not be written (disk full, read-only, I/O error); "
        "every answer received is kept; rerun once the disk is fixed",
    ),
    EXIT_RETRY_LATER: ("retry_later", "the server asked to come back later than --max-retry-wait"),
    EXIT_LOCKED: ("locked", "another live run holds OUTPUT: nothing was sent; try again later"),
    EXIT_BATCHES_RUNNING: (
        "batches_running",
        "--batch --no-wait: batches are still running at the provider; run the same command "
        "again later to collect them",
    ),
}


def exit_reason(code: int) -> str:
    """The short name of an exit code (``exit_reason`` in the summary JSON)."""
    return EXIT_CODES.get(code, ("unknown", ""))[0]


class PipelineError(Exception):
    """Base of every error this package raises on purpose."""


class UsageError(PipelineError):
    """The run cannot start as asked; nothing has been sent. Exit code 2."""


class ConfigError(UsageError):
    """An option, config file or environment setting is wrong."""


class InputError(UsageError):
    """The input file or its columns cannot produce prompts."""


class OutputError(UsageError):
    """OUTPUT or its checkpoint cannot be used as asked."""


class NoCheckpoint(OutputError):
    """``pipeline status`` / ``merge`` found no checkpoint for the output."""


class FingerprintMismatch(OutputError):
    """The checkpoint was made with settings that change responses."""


class LockHeld(PipelineError):
    """Another live process is running on the same OUTPUT."""


class RunAborted(PipelineError):
    """The run stopped before the end; completed work is kept and a rerun resumes."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RequestError(PipelineError):
    """One attempt of one row failed.

    Fields: ``status`` (HTTP status or None), ``code``/``type`` (from the error body),
    ``retry_after`` (seconds the server asked us to wait, or None), ``headers`` (the
    rate-limit and accounting headers of the response, if any), ``attempts`` (how many
    attempts the row made before this error ended it: 1 until ``retry.py`` says more).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        type: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.attempts = attempts
        self.headers = headers or {}
        self.status = status
        self.code = code
        self.type = type
        self.retry_after = retry_after

    @property
    def kind(self) -> str:
        """Short name for the ``error_type`` column."""
        return type(self).__name__


class RetryableError(RequestError):
    """Worth another attempt after a wait."""


class RateLimited(RetryableError):
    """429 rate limit (not a quota problem)."""


class ServerError(RetryableError):
    """408, 409 or 5xx."""


class TransportError(RetryableError):
    """No usable HTTP response: timeout, refused, reset or dropped connection."""


class ConnectFailed(TransportError):
    """No connection could be opened: refused, the host does not resolve, unreachable."""

    @property
    def kind(self) -> str:
        return "TransportError"  # the error_type column keeps its name


class MalformedResponse(RetryableError):
    """HTTP 200 whose body is not a valid chat completion."""


class RowError(RequestError):
    """The row ends with this error; retrying would not help."""


class BadRequest(RowError):
    """400, 404, 422 or another 4xx the server will answer the same way again."""


class InvalidRow(RowError):
    """The row's own data cannot make a request (for example a malformed messages column)."""


class UnexpectedError(RowError):
    """An exception that no request error describes, raised while an attempt was made or
    its answer read (a body that breaks the JSON parser, say): the row ends with it, under
    the exception's own type name, and the run goes on."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}"[:2000])
        self.original = type(exc).__name__

    @property
    def kind(self) -> str:
        return self.original


class ResponseTooLarge(RowError):
    """The response body is over ``--max-response-bytes`` as received or as decoded (or
    stacks more than two content codings); sent again it would be as large."""


class FatalError(RequestError):
    """Every further row would fail the same way: stop the run."""


class AuthenticationError(FatalError):
    """401: the API key is missing, expired or invalid."""


class PermissionDenied(FatalError):
    """403: at the AI/ML API, out of credits or a spend limit reached."""


class QuotaExceeded(FatalError):
    """429 insufficient_quota: the account has no quota left."""


class ServerSaysLater(FatalError):
    """429s in a row ask to come back later than ``--max-retry-wait``: stop, rows stay pending.

    ``retry_after`` is the longest wait asked (seconds); the run exits with code 7.
    """


class CertificateError(FatalError):
    """The server's TLS certificate fails verification (untrusted, expired, wrong host):
    every row would fail the same way, and retrying will not heal it."""


class BudgetReached(FatalError):
    """The next request could cross ``--max-cost`` or ``--max-total-tokens``: stop sending."""
