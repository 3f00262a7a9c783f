"""The HTTP edge over raw sockets: what a naive proxy gets wrong on the wire."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import RunningProxy, RunningSandbox, RunningUpstream, config_dict

StartProxy = Callable[..., Awaitable[RunningProxy]]


async def raw_exchange(url: str, request: bytes, read_timeout: float = 5) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = b""
    try:
        async with asyncio.timeout(read_timeout):
            while chunk := await reader.read(65536):
                data += chunk
                if b"\r\n\r\n" in data:
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = [
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ]
                    if length and len(body) >= length[0]:
                        break
    except TimeoutError:
        pass
    writer.close()
    return data


@pytest.fixture
async def up_proxy(
    start_proxy: StartProxy, sandbox: RunningSandbox, upstream: RunningUpstream
) -> RunningProxy:
    return await start_proxy(config_dict(sandbox, countries={"de": upstream.restapi_url("de")}))


@pytest.mark.parametrize("method", [b"get", b"G3T", b"PROPFIND", b"TRACE", b"CONNECT"])
async def test_unusual_methods_are_refused(
    up_proxy: RunningProxy, upstream: RunningUpstream, method: bytes
) -> None:
    target = b"127.0.0.1:1" if method == b"CONNECT" else b"/de/echo"
    answer = await raw_exchange(up_proxy.url, method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.split()[1] in (b"400", b"405"), status_line
    assert upstream.state.requests == []


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2"])
async def test_unsupported_http_versions_are_refused(
    up_proxy: RunningProxy, upstream: RunningUpstream, version: bytes
) -> None:
    answer = await raw_exchange(up_proxy.url, b"GET /de/echo " + version + b"\r\nHost: x\r\n\r\n")
    assert answer.split(b"\r\n", 1)[0].split()[1] in (b"400", b"505"), answer[:200]
    assert upstream.state.requests == []


async def test_expect_100_continue_is_answered_by_the_proxy_and_not_forwarded(
    up_proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{up_proxy.url}/de/echo", data=b"z" * 5000, expect100=True) as r:
        assert r.status == 200
        seen = await r.json()
    assert seen["body_len"] == 5000
    assert "expect" not in {k.lower() for k, _ in seen["headers"]}


async def test_smuggling_framing_is_rejected_at_the_edge(
    up_proxy: RunningProxy, upstream: RunningUpstream
) -> None:
    request = (
        b"POST /de/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /de/echo HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    answer = await raw_exchange(up_proxy.url, request)
    # aiohttp's parser refuses it before any handler runs (its own text/plain 400).
    assert answer.split(b"\r\n", 1)[0].split()[1] == b"400"
    assert upstream.state.requests == []


async def serve_raw(response: bytes) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[bytes], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(response: bytes) -> int:
        server, port = await serve_raw(response)
        servers.append(server)
        return port

    yield start
    for s in servers:
        s.close()


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello",
    ],
    ids=["cl-and-te", "two-lengths", "list-length", "negative"],
)
async def test_conflicting_upstream_framing_is_a_502(
    start_proxy: StartProxy,
    sandbox: RunningSandbox,
    raw_upstream: Callable[[bytes], Awaitable[int]],
    http: aiohttp.ClientSession,
    response: bytes,
) -> None:
    port = await raw_upstream(response)
    proxy = await start_proxy(config_dict(sandbox, countries={"de": f"http://127.0.0.1:{port}/de"}))
    async with http.get(f"{proxy.url}/de/anything") as r:
        assert r.status == 502
        assert r.headers["Content-Type"].startswith("application/problem+json")
        doc = json.loads(await r.read())
    assert doc["hop"] == "upstream_response"


async def test_odd_method_message_and_allow_header(
    up_proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    async with http.request("PROPFIND", f"{up_proxy.url}/de/echo") as r:
        assert r.status == 405
        assert "GET" in r.headers["Allow"]
        assert "not a REST API method" in json.loads(await r.read())["detail"]


async def test_upstream_tls_certificates_are_verified(
    aiohttp_server: Any, start_proxy: StartProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    """An upstream whose certificate the proxy cannot verify gets no request and no token."""
    import ssl

    import trustme

    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text="should not be reached")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app, ssl=context)
    proxy = await start_proxy(config_dict(sandbox, countries={"de": f"https://127.0.0.1:{server.port}/de"}))
    async with http.get(f"{proxy.url}/de/api/records") as r:
        assert r.status == 502
        doc = json.loads(await r.read())
    assert doc["hop"] == "upstream_connect" and "TLS certificate" in doc["detail"]
    assert seen == []
