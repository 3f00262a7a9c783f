"""A test upstream: a real aiohttp server that stands in for a REST API where the sandbox
cannot (huge bodies, gzip, odd headers, slow or dying answers).

It is mounted under ``/up/{cc}`` so that a country's ``restapi_url`` carries a base
path, like ``http://127.0.0.1:PORT/up/de``. It never echoes the bearer token: it reports
whether the token was one the sandbox issued.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

CHUNK = 64 * 1024
PATTERN = bytes(range(256)) * (CHUNK // 256)
GZIP_PLAIN = b'{"data": "' + b"compressible " * 5000 + b'"}'
GZIP_BODY = gzip.compress(GZIP_PLAIN, mtime=0)


def pattern_bytes(size: int) -> bytes:
    """The first ``size`` bytes of the download pattern (for checksums)."""
    whole, rest = divmod(size, CHUNK)
    return PATTERN * whole + PATTERN[:rest]


def pattern_sha256(size: int) -> str:
    h = hashlib.sha256()
    whole, rest = divmod(size, CHUNK)
    for _ in range(whole):
        h.update(PATTERN)
    h.update(PATTERN[:rest])
    return h.hexdigest()


@dataclass
class UpstreamState:
    token_ok: Callable[[str], bool]
    requests: list[dict[str, object]] = field(default_factory=list)
    open_requests: int = 0


UPSTREAM: web.AppKey[UpstreamState] = web.AppKey("upstream", UpstreamState)


def _auth_state(request: web.Request, state: UpstreamState) -> str:
    value = request.headers.getall("Authorization", [])
    if not value:
        return "missing"
    if len(value) > 1:
        return "duplicated"
    scheme, _, token = value[0].partition(" ")
    return "valid" if scheme == "Bearer" and state.token_ok(token) else "invalid"


async def dispatch(request: web.Request) -> web.StreamResponse:
    state = request.app[UPSTREAM]
    action = request.match_info["action"]
    auth = _auth_state(request, state)
    state.open_requests += 1
    try:
        if action == "echo":
            digest = hashlib.sha256()
            size = 0
            if request.body_exists:
                async for chunk in request.content.iter_any():
                    digest.update(chunk)
                    size += len(chunk)
            record: dict[str, object] = {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items() if k.lower() != "authorization"],
                "authorization": auth,
                "body_sha256": digest.hexdigest(),
                "body_len": size,
                "peer": request.remote,
            }
            state.requests.append(record)
            return web.json_response(record)
        if action == "download":
            size = int(request.query["size"])
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            if request.query.get("length") == "1":
                resp.content_length = size
            await resp.prepare(request)
            whole, rest = divmod(size, CHUNK)
            for _ in range(whole):
                await resp.write(PATTERN)
            if rest:
                await resp.write(PATTERN[:rest])
            await resp.write_eof()
            return resp
        if action == "die":
            # Promise a body, send part of it, then drop the connection.
            resp = web.StreamResponse()
            if request.query.get("length") == "1":
                resp.content_length = 10 * CHUNK
            await resp.prepare(request)
            await resp.write(PATTERN)
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()
            return resp
        if action == "gzip":
            return web.Response(
                body=GZIP_BODY,
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json", "ETag": '"g1"'},
            )
        if action == "cookies":
            resp = web.json_response({"cookie": request.headers.get("Cookie")})
            resp.headers.add("Set-Cookie", "a=1; Path=/")
            resp.headers.add("Set-Cookie", "b=2; Path=/")
            return resp
        if action == "hop":
            resp = web.Response(text="hop")
            resp.headers["Connection"] = "X-Private"
            resp.headers["X-Private"] = "secret-hop"
            resp.headers["Keep-Alive"] = "timeout=5"
            resp.headers["Proxy-Authenticate"] = "Basic"
            resp.headers["X-Kept"] = "kept"
            return resp
        if action == "status":
            code = int(request.query["code"])
            return web.Response(status=code, headers={"X-Status": str(code)})
        if action == "slow":
            await asyncio.sleep(float(request.query["delay"]))
            return web.Response(text="slow")
        if action == "auth":
            return web.json_response({"authorization": auth})
        return web.Response(status=404, text="no such action")
    finally:
        state.open_requests -= 1


def build_upstream_app(token_ok: Callable[[str], bool]) -> web.Application:
    app = web.Application(handler_args={"auto_decompress": False}, client_max_size=1024**3)
    app[UPSTREAM] = UpstreamState(token_ok=token_ok)
    app.router.add_route("*", "/up/{cc}/{action}{rest:.*}", dispatch)
    return app
