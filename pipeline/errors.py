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
    ├── LockHeld                        exit 2: another live run owns this OUTPUT
    ├── RunAborted                      exit 3: auth, quota or signal; a rerun resumes
    └── RequestError                    one attempt of one row failed
        ├── RetryableError              retried with backoff
        │   ├── RateLimited             429 (not quota)
        │   ├── ServerError             408, 409, 5xx
        │   ├── TransportError          timeout, connection refused/reset/dropped
        │   └── MalformedResponse       200 whose body is not a valid completion
        ├── RowError                    not retried: the row ends with this error
        │   ├── BadRequest              400 (incl. context length), 404, 422, other 4xx, 3xx
        │   ├── InvalidRow              the row's own data cannot make a request
        │   └── ResponseTooLarge        body over --max-response-bytes (received or decoded)
        └── FatalError                  not retried: the whole run stops at once
            ├── AuthenticationError     401
            ├── PermissionDenied        403 (AI/ML API: out of credits / spend limit)
            ├── QuotaExceeded           429 insufficient_quota
            ├── CertificateError        the server's TLS certificate fails verification
            └── BudgetReached           the next request could cross --max-cost / tokens
"""

from __future__ import annotations


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
    rate-limit and accounting headers of the response, if any).
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
    ) -> None:
        super().__init__(message)
        self.message = message
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


class MalformedResponse(RetryableError):
    """HTTP 200 whose body is not a valid chat completion."""


class RowError(RequestError):
    """The row ends with this error; retrying would not help."""


class BadRequest(RowError):
    """400, 404, 422 or another 4xx the server will answer the same way again."""


class InvalidRow(RowError):
    """The row's own data cannot make a request (for example a malformed messages column)."""


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


class CertificateError(FatalError):
    """The server's TLS certificate fails verification (untrusted, expired, wrong host):
    every row would fail the same way, and retrying will not heal it."""


class BudgetReached(FatalError):
    """The next request could cross ``--max-cost`` or ``--max-total-tokens``: stop sending."""
