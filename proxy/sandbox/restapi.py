"""The emulated per-country REST API: bearer check and the record endpoints.

Each country lives under ``/{cc}`` (two lower-case letters). Its ``restapi_url``
is ``public_url + "/" + cc`` when a public URL is configured, else the request's
own ``scheme://Host/{cc}``; a token is accepted only if its audience names that
exact URL.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

from aiohttp import hdrs, web

from proxy.sandbox.errors import ApiError, api_error_response
from proxy.sandbox.keys import COUNTRY, SANDBOX_CLOCK, SANDBOX_SETTINGS, SANDBOX_STATE
from proxy.sandbox.records import parse_find, validate_record
from proxy.sandbox.state import StoredRecord

# A REST API path starts with a two-letter lower-case country segment.
COUNTRY_PATH_RE = re.compile(r"^/([a-z]{2})(?:/|$)")
CC = "{cc:[a-z]{2}}"

_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


def country_of_path(path: str) -> str | None:
    """The country code a REST API path is addressed to, or ``None``."""
    match = COUNTRY_PATH_RE.match(path)
    return match.group(1) if match else None


def restapi_url(request: web.Request, country: str) -> str:
    """The ``restapi_url`` of ``country`` as seen by the client of ``request``."""
    public_url = request.app[SANDBOX_SETTINGS].public_url
    if public_url is not None:
        return f"{public_url.rstrip('/')}/{country}"
    return f"{request.scheme}://{request.host}/{country}"


def bearer_problem(request: web.Request, country: str) -> str | None:
    """Why ``request`` may not call ``country``'s REST API, or ``None`` when it may.

    The answer names the failure (missing header, not a bearer token, unknown,
    revoked or expired token, wrong audience) but never repeats the token.
    """
    header = request.headers.get(hdrs.AUTHORIZATION)
    if not header:
        return "missing Authorization header"
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return "Authorization header must be 'Bearer <access token>'"
    now = request.app[SANDBOX_CLOCK]()
    return request.app[SANDBOX_STATE].token_problem(token, restapi_url(request, country), now)


def unauthorized_response(detail: str) -> web.Response:
    """401 in the REST API error shape, with ``WWW-Authenticate: Bearer error="invalid_token"``."""
    return api_error_response(ApiError(401, detail, "authorization", _UNAUTHORIZED_HEADERS))


def timestamp(now: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2024-04-01T12:00:00.000Z``."""
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def read_json(request: web.Request) -> object:
    """The JSON body of ``request``, or :class:`ApiError` (415 wrong type, 400 bad JSON)."""
    if request.content_type != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {request.content_type}", "headers")
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", "body") from None


async def create_record(request: web.Request) -> web.Response:
    """``POST /{cc}/api/records``: create or overwrite; 201 with the stored record.

    A new record gets ``version`` 1; each overwrite adds 1 and keeps
    ``created_at``. The record keeps its place in the store's creation order.
    """
    country = request[COUNTRY]
    state = request.app[SANDBOX_STATE]
    fields = validate_record(await read_json(request), country)
    now = timestamp(request.app[SANDBOX_CLOCK]())
    store = state.country_records(country)
    previous = store.get(fields["record_key"])
    if previous is None:
        record = StoredRecord(fields=fields, version=1, created_at=now, updated_at=now)
    else:
        record = StoredRecord(
            fields=fields,
            version=previous.version + 1,
            created_at=previous.created_at,
            updated_at=now,
        )
    store[fields["record_key"]] = record
    state.writes += 1
    return web.json_response(record.to_json(), status=201)


async def find_records(request: web.Request) -> web.Response:
    """``POST /{cc}/api/records/find``: 200 ``{"data": [...], "meta": {...}}`` (see parse_find)."""
    country = request[COUNTRY]
    query = parse_find(await read_json(request), country)
    records = request.app[SANDBOX_STATE].records.get(country, {}).values()
    page, total = query.run(records)
    return web.json_response(
        {
            "data": [r.to_json() for r in page],
            "meta": {
                "count": len(page),
                "limit": query.limit,
                "offset": query.offset,
                "total": total,
            },
        }
    )


async def delete_record(request: web.Request) -> web.Response:
    """``DELETE /{cc}/api/records/{country}/{record_key}``: 204, or 404 when absent.

    The record's files go with it. A ``{country}`` other than ``cc`` is a 400.
    """
    country = request[COUNTRY]
    path_country = request.match_info["country"]
    if path_country != country:
        raise ApiError(400, f"country in the path must be {country!r}, got {path_country!r}", "path.country")
    record_key = request.match_info["record_key"]
    if not request.app[SANDBOX_STATE].delete_record(country, record_key):
        raise ApiError(404, "record not found", "path.record_key")
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    """Register the record endpoints (route names start with ``restapi.``)."""
    app.router.add_post(f"/{CC}/api/records", create_record, name="restapi.records_create")
    app.router.add_post(f"/{CC}/api/records/find", find_records, name="restapi.records_find")
    app.router.add_delete(
        f"/{CC}/api/records/{{country}}/{{record_key}}",
        delete_record,
        name="restapi.records_delete",
    )
