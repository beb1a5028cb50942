"""The errors of the HTTP/1.1 transport that httpx has no class for.

Owns ``ResponseTooLarge`` (a body over the cap), ``CertificateNotTrusted`` (TLS verification
failed) and ``ClosedBeforeResponse`` (a connection closed before any response byte: the pool
may resend on a fresh connection). Each subclasses the httpx error it refines; which of our
``pipeline.errors`` a failure becomes is decided by the adapter in ``pipeline/transport.py``.
"""

from __future__ import annotations

import httpx


class ClosedBeforeResponse(httpx.ReadError):
    """The connection closed before any byte of the response arrived (maybe a stale one)."""


class ResponseTooLarge(httpx.RemoteProtocolError):
    """A body over the size cap (as received or decoded), or too many content codings."""


class CertificateNotTrusted(httpx.ConnectError):
    """The server's TLS certificate failed verification: it will fail the same way again."""


def too_large(limit: int, what: str) -> ResponseTooLarge:
    return ResponseTooLarge(
        f"response body {what} over {limit:,} bytes; raise --max-response-bytes if it is real"
    )
