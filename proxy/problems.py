"""Errors as ``application/problem+json`` (RFC 9457): the one place they are rendered."""

from __future__ import annotations

import json

from aiohttp import web

from proxy.errors import ProxyError

PROBLEM_CONTENT_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:incountry-proxy:problem:"


def problem_response(
    error: ProxyError, *, request_id: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """Render ``error`` as a problem document with the matching status and headers.

    Besides RFC 9457's members, ``hop`` names which hop failed (routing, token_server,
    upstream_connect, upstream_timeout, client, proxy) so callers and log pipelines
    can tell the proxy's own failures from the upstream's.
    """
    doc: dict[str, object] = {
        "type": TYPE_PREFIX + error.slug,
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "hop": error.hop,
        **error.extra,
    }
    if request_id:
        doc["instance"] = f"urn:incountry-proxy:request:{request_id}"
    out_headers = {**error.headers, **(headers or {})}
    if error.retry_after is not None:
        out_headers["Retry-After"] = str(error.retry_after)
    if request_id:
        out_headers["X-Request-Id"] = request_id
    out_headers["Cache-Control"] = "no-store"
    return web.Response(
        status=error.status,
        body=json.dumps(doc).encode(),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=out_headers,
    )
