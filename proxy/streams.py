"""Reading small bodies whole, with a bound (token answers, 401 details).

``StreamReader.read(n)`` returns what has arrived so far, up to ``n`` bytes: a body
split across packets would be cut short. These helpers read to the end instead.
"""

from __future__ import annotations

import aiohttp


class BodyTooLong(Exception):
    """The body went past the bound; it was not read further."""


async def read_bounded(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The whole body, or :class:`BodyTooLong` once it passes ``limit`` bytes."""
    body = await read_prefix(content, limit + 1)
    if len(body) > limit:
        raise BodyTooLong(f"body longer than {limit} bytes")
    return body


async def read_prefix(content: aiohttp.StreamReader, limit: int) -> bytes:
    """At most the first ``limit`` bytes of the body, reading until then or the end."""
    body = bytearray()
    async for chunk in content.iter_any():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])
