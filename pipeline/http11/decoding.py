"""Response bodies: the size cap and content decoding (gzip, deflate), bomb-proof.

Owns ``DEFAULT_MAX_RESPONSE_BYTES``, ``decode_body`` (undo a Content-Encoding without ever
decoding past the cap) and ``join_capped`` (a streamed body, refused past the cap; used by
the aiohttp and httpx backends too). It does not parse HTTP framing (``connection.py``).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator

import httpx

from .errors import ResponseTooLarge, too_large

# Largest body accepted, as received and as decoded: a chat completion is rarely over a few MB,
# and a gzip bomb or an endless body must not take the memory of the whole run.
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_MAX_CODINGS = 2  # content codings stacked on one body ("gzip, gzip, ..." is a bomb)


async def join_capped(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """A body read piece by piece (as decoded by httpx or aiohttp), refused with
    ``ResponseTooLarge`` as soon as it passes ``limit`` bytes."""
    pieces = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise ResponseTooLarge(
                f"response body decoded over {limit:,} bytes; "
                "raise --max-response-bytes if it is real"
            )
        pieces.append(chunk)
    return b"".join(pieces)


def decode_body(body: bytes, coding: bytes, limit: int = DEFAULT_MAX_RESPONSE_BYTES) -> bytes:
    """Undo a ``Content-Encoding`` (gzip, x-gzip, deflate, identity; comma-separated).

    At most two codings, and no step may decode to more than ``limit`` bytes
    (``ResponseTooLarge``): zlib stops at ``limit`` + 1 bytes, so a bomb costs no more.
    """
    tokens = [t for t in (t.strip().lower() for t in coding.split(b",")) if t not in _IDENTITY]
    if len(tokens) > _MAX_CODINGS:
        raise ResponseTooLarge(
            f"{len(tokens)} content codings stacked ({coding[:60]!r}); at most {_MAX_CODINGS}"
        )
    for token in reversed(tokens):
        try:
            if token in (b"gzip", b"x-gzip"):
                # RFC 1952 allows several gzip members in a row
                body = _inflate(body, 16 + zlib.MAX_WBITS, limit, members=True)
            elif token == b"deflate":
                try:
                    body = _inflate(body, zlib.MAX_WBITS, limit)
                except zlib.error:  # some servers send raw deflate without the zlib wrapper
                    body = _inflate(body, -zlib.MAX_WBITS, limit)
            else:
                raise httpx.DecodingError(f"unsupported Content-Encoding {token[:40]!r}")
        except zlib.error as exc:
            raise httpx.DecodingError(f"body does not decode as {token.decode()}: {exc}") from None
    return body


_IDENTITY = (b"identity", b"")


def _inflate(data: bytes, wbits: int, limit: int, *, members: bool = False) -> bytes:
    out = []
    size = 0
    while data:
        decoder = zlib.decompressobj(wbits)
        piece = decoder.decompress(data, limit + 1 - size)
        size += len(piece)
        if size > limit:
            raise too_large(limit, "decoded")
        out.append(piece)
        if not decoder.eof:
            raise zlib.error("truncated stream")
        if not members:
            break
        data = decoder.unused_data.lstrip(b"\x00")
    return b"".join(out)
