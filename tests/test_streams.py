"""Bounded whole-body reads, against a server that sends its body in pieces."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.streams import BodyTooLong, read_bounded, read_prefix

PIECES = [b'{"access_token": ', b'"abc", "expires_in"', b": 300}"]


async def dribble(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    await resp.prepare(request)
    for piece in PIECES:
        await resp.write(piece)
        await asyncio.sleep(0.05)  # separate packets: a single read() would stop early
    await resp.write_eof()
    return resp


@pytest.fixture
async def url(aiohttp_server: Any) -> str:
    app = web.Application()
    app.router.add_get("/", dribble)
    server = await aiohttp_server(app)
    return str(server.make_url("/"))


async def test_read_bounded_reads_every_piece(url: str) -> None:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert await read_bounded(r.content, 1000) == b"".join(PIECES)


async def test_read_bounded_stops_past_the_limit(url: str) -> None:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        with pytest.raises(BodyTooLong):
            await read_bounded(r.content, 20)


async def test_read_prefix_returns_at_most_the_limit(url: str) -> None:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert await read_prefix(r.content, 20) == b"".join(PIECES)[:20]
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert await read_prefix(r.content, 1000) == b"".join(PIECES)
