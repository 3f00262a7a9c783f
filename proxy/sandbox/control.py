"""Control endpoints for tests and QA, under ``/_sandbox/``.

They change or reveal the sandbox's state, so they answer only to loopback
peers (127.0.0.0/8, ::1); anyone else gets 403. They never reveal a token or a
client secret.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json

from aiohttp import web

from proxy.sandbox.errors import ApiError
from proxy.sandbox.faults import Faults, FaultSpecError
from proxy.sandbox.keys import SANDBOX_STATE


def is_loopback(remote: str | None) -> bool:
    """Whether ``remote`` (a peer address as aiohttp reports it) is a loopback address."""
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
        address = address.ipv4_mapped
    return address.is_loopback


def _require_loopback(request: web.Request) -> None:
    if not is_loopback(request.remote):
        raise ApiError(403, "sandbox control endpoints answer only to loopback clients", "remote")


async def stats(request: web.Request) -> web.Response:
    """``GET /_sandbox/stats``: the state's counters (see ``SandboxState.stats``)."""
    _require_loopback(request)
    return web.json_response(request.app[SANDBOX_STATE].stats())


async def reset(request: web.Request) -> web.Response:
    """``POST /_sandbox/reset``: forget counters, tokens, records, files and faults."""
    _require_loopback(request)
    request.app[SANDBOX_STATE].reset()
    return web.json_response({"reset": True})


async def revoke_tokens(request: web.Request) -> web.Response:
    """``POST /_sandbox/tokens/revoke``: invalidate every issued token; says how many."""
    _require_loopback(request)
    revoked = request.app[SANDBOX_STATE].revoke_all_tokens()
    return web.json_response({"revoked": revoked})


async def token_digests(request: web.Request) -> web.Response:
    """``GET /_sandbox/tokens/digests``: SHA-256 of every token ever issued, never a token.

    Lets an out-of-process leak scan recognise a token in some output (hash each
    token-shaped word and compare) without this endpoint handing the tokens out.
    """
    _require_loopback(request)
    digests = sorted(
        {hashlib.sha256(t.encode()).hexdigest() for t in request.app[SANDBOX_STATE].issued_tokens}
    )
    return web.json_response({"sha256": digests})


async def get_faults(request: web.Request) -> web.Response:
    """``GET /_sandbox/faults``: the active faults, every key present, countdowns as they stand."""
    _require_loopback(request)
    return web.json_response(request.app[SANDBOX_STATE].faults.to_json())


async def put_faults(request: web.Request) -> web.Response:
    """``PUT /_sandbox/faults``: replace the active faults with the JSON body.

    The body has the shape documented in :mod:`proxy.sandbox.faults` (any
    Content-Type is accepted). Anything unknown or invalid is a 400 naming the
    key, and leaves the active faults as they were. Answers like ``GET``.
    """
    _require_loopback(request)
    raw = await request.read()
    try:
        spec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the body must be a JSON object describing the faults", "body") from None
    try:
        faults = Faults.parse(spec if spec is not None else {})
    except FaultSpecError as exc:
        raise ApiError(400, exc.message, f"body.{exc.source}" if exc.source else "body") from None
    state = request.app[SANDBOX_STATE]
    state.faults = faults
    return web.json_response(state.faults.to_json())


async def delete_faults(request: web.Request) -> web.Response:
    """``DELETE /_sandbox/faults``: switch every fault off; answers like ``GET``."""
    _require_loopback(request)
    state = request.app[SANDBOX_STATE]
    state.clear_faults()
    return web.json_response(state.faults.to_json())


def add_routes(app: web.Application) -> None:
    """Register the control endpoints (route names start with ``control.``)."""
    app.router.add_get("/_sandbox/stats", stats, name="control.stats")
    app.router.add_post("/_sandbox/reset", reset, name="control.reset")
    app.router.add_post("/_sandbox/tokens/revoke", revoke_tokens, name="control.revoke")
    app.router.add_get("/_sandbox/tokens/digests", token_digests, name="control.token_digests")
    app.router.add_get("/_sandbox/faults", get_faults, name="control.faults_get")
    app.router.add_put("/_sandbox/faults", put_faults, name="control.faults_put")
    app.router.add_delete("/_sandbox/faults", delete_faults, name="control.faults_delete")
