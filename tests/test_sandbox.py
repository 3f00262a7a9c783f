"""Tests of the local InCountry emulator (proxy.sandbox), over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import ClientSession, FormData, encode_basic_auth, web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs

from proxy.sandbox import (
    DEFAULT_CLIENT,
    SANDBOX_STATE,
    SandboxClient,
    SandboxSettings,
    SandboxState,
    build_sandbox_app,
    run_sandbox,
)
from proxy.sandbox.control import is_loopback
from proxy.sandbox.files import content_disposition
from tests.conftest import ManualClock

START = 1_700_000_000.0


def basic(client_id: str, secret: str) -> dict[str, str]:
    """Headers carrying HTTP Basic client credentials."""
    return {"Authorization": encode_basic_auth(client_id, secret)}


GOOD_AUTH = basic(DEFAULT_CLIENT.client_id, DEFAULT_CLIENT.client_secret)
TOKEN_PATH = "/oauth2/token/"


# --------------------------------------------------------------------------- fixtures


@dataclass
class Sandbox:
    server: TestServer
    clock: ManualClock
    settings: SandboxSettings
    session: ClientSession
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def state(self) -> SandboxState:
        return self.server.app[SANDBOX_STATE]

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    def restapi_url(self, cc: str) -> str:
        """The restapi_url the sandbox derives for requests sent by ``session``."""
        return self.url(f"/{cc}")

    def token_form(self, cc: str = "de", /, **changes: str | None) -> dict[str, str]:
        r = self.restapi_url(cc)
        form: dict[str, str | None] = {
            "grant_type": "client_credentials",
            "scope": DEFAULT_CLIENT.environment_id,
            "audience": f"{r} {r}",
        }
        form.update(changes)
        return {k: v for k, v in form.items() if v is not None}

    async def token(self, cc: str = "de") -> str:
        """A fresh valid access token for country ``cc``."""
        async with self.session.post(
            self.url(TOKEN_PATH), data=self.token_form(cc), headers=GOOD_AUTH
        ) as resp:
            assert resp.status == 200, await resp.text()
            token: str = (await resp.json())["access_token"]
        return token

    async def headers(self, cc: str = "de") -> dict[str, str]:
        """Authorization headers with a cached token for ``cc``."""
        if cc not in self.tokens:
            self.tokens[cc] = await self.token(cc)
        return {"Authorization": f"Bearer {self.tokens[cc]}"}

    async def api(
        self, method: str, path: str, cc: str = "de", **kwargs: Any
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        """Call ``/{cc}{path}`` with a valid token; return status, JSON (or bytes), response."""
        headers = {**(await self.headers(cc)), **kwargs.pop("headers", {})}
        async with self.session.request(method, self.url(f"/{cc}{path}"), headers=headers, **kwargs) as resp:
            raw = await resp.read()
            body: Any = await resp.json() if resp.content_type == "application/json" else raw
            return resp.status, body, resp

    async def create(self, cc: str = "de", **record: Any) -> dict[str, Any]:
        status, body, _ = await self.api("POST", "/api/records", cc, json=record)
        assert status == 201, body
        result: dict[str, Any] = body
        return result


SandboxFactory = Callable[..., Awaitable[Sandbox]]


@pytest.fixture
async def session() -> AsyncIterator[ClientSession]:
    async with ClientSession() as s:
        yield s


@pytest.fixture
def make_sandbox(aiohttp_server: AiohttpServer, session: ClientSession) -> SandboxFactory:
    async def factory(app_hook: Callable[[web.Application], None] | None = None, **settings: Any) -> Sandbox:
        clock = ManualClock(START)
        sandbox_settings = SandboxSettings(**settings)
        app = build_sandbox_app(sandbox_settings, clock)
        if app_hook is not None:
            app_hook(app)
        server = await aiohttp_server(app)
        return Sandbox(server, clock, sandbox_settings, session)

    return factory


@pytest.fixture
async def sandbox(make_sandbox: SandboxFactory) -> Sandbox:
    return await make_sandbox()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def assert_api_error(body: Any, status_title: str, fragment: str) -> None:
    assert set(body) == {"errors"}
    (error,) = body["errors"]
    assert error["title"] == status_title
    assert fragment in error["detail"], error
    assert "source" in error


# --------------------------------------------------------------------------- token endpoint


async def test_token_success_shape_and_bookkeeping(sandbox: Sandbox) -> None:
    async with sandbox.session.post(
        sandbox.url(TOKEN_PATH), data=sandbox.token_form(), headers=GOOD_AUTH
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        body = await resp.json()
    assert set(body) == {"access_token", "expires_in", "scope", "token_type"}
    assert body["expires_in"] == 300
    assert body["scope"] == "sandbox-env"
    assert body["token_type"] == "bearer"
    assert len(body["access_token"]) >= 40  # token_urlsafe(32) gives 43 characters
    assert sandbox.state.issued_tokens == [body["access_token"]]
    assert sandbox.state.token_requests == 1
    grant = sandbox.state.tokens[body["access_token"]]
    assert grant.expires_at == START + 300
    assert grant.audience == frozenset({sandbox.restapi_url("de")})


async def test_token_lifetime_comes_from_settings(make_sandbox: SandboxFactory) -> None:
    sandbox = await make_sandbox(expires_in=3599)
    async with sandbox.session.post(
        sandbox.url(TOKEN_PATH), data=sandbox.token_form(), headers=GOOD_AUTH
    ) as resp:
        assert (await resp.json())["expires_in"] == 3599


@pytest.mark.parametrize(
    "path", ["/oauth2/token/", "/oauth2/token", "/idp/oauth2/token/", "/emea/oauth2/token"]
)
async def test_every_token_path_issues_and_is_counted(sandbox: Sandbox, path: str) -> None:
    async with sandbox.session.post(sandbox.url(path), data=sandbox.token_form(), headers=GOOD_AUTH) as resp:
        assert resp.status == 200
        token = (await resp.json())["access_token"]
    assert sandbox.state.token_requests_by_path == {path: 1}
    status, _, _ = await sandbox.api(
        "POST", "/api/records/find", json={}, headers={"Authorization": f"Bearer {token}"}
    )
    assert status == 200


@dataclass(frozen=True)
class TokenCase:
    id: str
    status: int
    error: str
    fragment: str
    changes: dict[str, str | None] = field(default_factory=dict)
    auth: dict[str, str] = field(default_factory=lambda: GOOD_AUTH)
    headers: dict[str, str] = field(default_factory=dict)
    as_json: bool = False
    skip_user_agent: bool = False
    raw_body: str | None = None


TOKEN_CASES = [
    TokenCase("no-client-auth", 401, "invalid_client", "missing", auth={}),
    TokenCase("wrong-secret", 401, "invalid_client", "failed", auth=basic("sandbox-client", "x")),
    TokenCase("unknown-client", 401, "invalid_client", "failed", auth=basic("nobody", "x")),
    TokenCase(
        "bearer-not-basic", 401, "invalid_client", "Basic", auth={"Authorization": "Bearer abc"},
    ),
    TokenCase("json-body", 400, "invalid_request", "Content-Type", as_json=True),
    TokenCase("no-grant-type", 400, "invalid_request", "grant_type", {"grant_type": None}),
    TokenCase(
        "password-grant", 400, "unsupported_grant_type", "password", {"grant_type": "password"}
    ),
    TokenCase("no-scope", 400, "invalid_request", "scope", {"scope": None}),
    TokenCase("wrong-scope", 400, "invalid_scope", "environment", {"scope": "other-env"}),
    TokenCase("no-audience", 400, "invalid_request", "audience", {"audience": None}),
    TokenCase("one-url", 400, "invalid_request", "two URLs", {"audience": "{r}"}),
    TokenCase("three-urls", 400, "invalid_request", "two URLs", {"audience": "{r} {r} {r}"}),
    TokenCase("two-spaces", 400, "invalid_request", "one space", {"audience": "{r}  {r}"}),
    TokenCase("relative-url", 400, "invalid_request", "absolute", {"audience": "/de /de"}),
    TokenCase("ftp-url", 400, "invalid_request", "absolute", {"audience": "ftp://h/de ftp://h/de"}),
    TokenCase(
        "storage-mismatch", 400, "invalid_target", "-restapi",
        {"audience": "{r} http://elsewhere.example/de"},
    ),
    TokenCase(
        "restapi-not-stripped", 400, "invalid_target", "https://de-mt-01.api.incountry.io",
        {
            "audience": "https://de-restapi-mt-01.api.incountry.io "
            "https://de-restapi-mt-01.api.incountry.io"
        },
    ),
    TokenCase(
        "repeated-parameter", 400, "invalid_request", "repeated",
        raw_body="grant_type=client_credentials&grant_type=client_credentials"
        "&scope=sandbox-env&audience={ra}",
    ),
    TokenCase(
        "no-user-agent", 400, "invalid_request", "User-Agent header is mandatory",
        skip_user_agent=True,
    ),
    TokenCase(
        "blank-user-agent", 400, "invalid_request", "User-Agent header is mandatory",
        headers={"User-Agent": " "},
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", TOKEN_CASES, ids=[c.id for c in TOKEN_CASES])
async def test_token_rule_violations(sandbox: Sandbox, case: TokenCase) -> None:
    r = sandbox.restapi_url("de")
    form = sandbox.token_form(
        **{k: (v.format(r=r) if v is not None else None) for k, v in case.changes.items()}
    )
    kwargs: dict[str, Any] = {"headers": {**case.auth, **case.headers}}
    if case.raw_body is not None:
        kwargs["data"] = case.raw_body.format(ra=quote(f"{r} {r}", safe=""))
        kwargs["headers"]["Content-Type"] = "application/x-www-form-urlencoded"
    elif case.as_json:
        kwargs["json"] = form
    else:
        kwargs["data"] = form
    if case.skip_user_agent:
        kwargs["skip_auto_headers"] = ["User-Agent"]

    async with sandbox.session.post(sandbox.url(TOKEN_PATH), **kwargs) as resp:
        body = await resp.json()
        assert resp.status == case.status, body
        assert resp.headers["Cache-Control"] == "no-store"
        if case.status == 401:
            assert resp.headers["WWW-Authenticate"] == 'Basic realm="incountry"'
    assert set(body) == {"error", "error_description", "error_hint", "status_code"}
    assert body["error"] == case.error
    assert body["status_code"] == case.status
    assert case.fragment in body["error_description"]
    assert body["error_hint"]
    # A refused request issues nothing but is still counted.
    assert sandbox.state.issued_tokens == []
    assert sandbox.state.tokens == {}
    assert sandbox.state.token_requests == 1


async def test_token_endpoint_rejects_get_in_oauth_shape(sandbox: Sandbox) -> None:
    async with sandbox.session.get(sandbox.url(TOKEN_PATH)) as resp:
        assert resp.status == 405
        body = await resp.json()
    assert body["error"] == "invalid_request"
    assert body["status_code"] == 405
    assert sandbox.state.token_requests == 0  # only POSTs count


async def test_each_client_has_its_own_scope(make_sandbox: SandboxFactory) -> None:
    other = SandboxClient("other-client", "other-secret", "other-env")
    sandbox = await make_sandbox(clients=(DEFAULT_CLIENT, other))
    auth = basic(other.client_id, other.client_secret)
    async with sandbox.session.post(sandbox.url(TOKEN_PATH), data=sandbox.token_form(), headers=auth) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_scope"
    async with sandbox.session.post(
        sandbox.url(TOKEN_PATH), data=sandbox.token_form(scope="other-env"), headers=auth
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["scope"] == "other-env"


async def test_production_style_audience_is_accepted_but_does_not_fit_sandbox(
    sandbox: Sandbox,
) -> None:
    audience = "https://de-restapi-mt-01.api.incountry.io https://de-mt-01.api.incountry.io"
    async with sandbox.session.post(
        sandbox.url(TOKEN_PATH), data=sandbox.token_form(audience=audience), headers=GOOD_AUTH
    ) as resp:
        assert resp.status == 200
        token = (await resp.json())["access_token"]
    status, body, _ = await sandbox.api(
        "POST", "/api/records/find", json={}, headers={"Authorization": f"Bearer {token}"}
    )
    assert status == 401
    assert_api_error(body, "Unauthorized", "audience")


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="public_url"):
        SandboxSettings(public_url="not a url")
    with pytest.raises(ValueError, match="unique"):
        SandboxSettings(clients=(DEFAULT_CLIENT, DEFAULT_CLIENT))
    assert "sandbox-secret" not in repr(SandboxSettings())


# --------------------------------------------------------------------------- REST API auth


@pytest.mark.parametrize(
    ("authorization", "fragment"),
    [
        (None, "missing"),
        ("Bearer not-a-real-token", "unknown"),
        ("Basic c2FuZGJveC1jbGllbnQ6c2FuZGJveC1zZWNyZXQ=", "Bearer"),
        ("Bearer ", "Bearer"),
    ],
)
async def test_restapi_rejects_bad_credentials(
    sandbox: Sandbox, authorization: str | None, fragment: str
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with sandbox.session.post(
        sandbox.url("/de/api/records"), json={"record_key": "k"}, headers=headers
    ) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        body = await resp.json()
    assert_api_error(body, "Unauthorized", fragment)
    assert body["errors"][0]["source"] == "authorization"
    assert sandbox.state.unauthorized == 1
    assert sandbox.state.api_requests == 1
    assert sandbox.state.records == {}


async def test_expired_token_is_rejected(sandbox: Sandbox) -> None:
    await sandbox.headers("de")
    sandbox.clock.advance(299.5)
    status, _, _ = await sandbox.api("POST", "/api/records/find", json={})
    assert status == 200
    sandbox.clock.advance(0.5)  # exactly expires_at
    status, body, _ = await sandbox.api("POST", "/api/records/find", json={})
    assert status == 401
    assert_api_error(body, "Unauthorized", "expired")


async def test_token_for_one_country_is_rejected_by_another(sandbox: Sandbox) -> None:
    de = await sandbox.headers("de")
    status, _, _ = await sandbox.api("POST", "/api/records/find", "de", json={})
    assert status == 200
    async with sandbox.session.post(sandbox.url("/au/api/records/find"), json={}, headers=de) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert_api_error(body, "Unauthorized", "audience")
    assert sandbox.restapi_url("au") in body["errors"][0]["detail"]


async def test_revoked_tokens_are_rejected(sandbox: Sandbox) -> None:
    status, _, _ = await sandbox.api("POST", "/api/records/find", json={})
    assert status == 200
    async with sandbox.session.post(sandbox.url("/_sandbox/tokens/revoke")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"revoked": 1}
    status, body, _ = await sandbox.api("POST", "/api/records/find", json={})
    assert status == 401
    assert_api_error(body, "Unauthorized", "revoked")
    # A new token works again; revoke_all_tokens() on the state does the same job.
    sandbox.tokens.clear()
    status, _, _ = await sandbox.api("POST", "/api/records/find", json={})
    assert status == 200
    assert sandbox.state.revoke_all_tokens() == 1
    status, _, _ = await sandbox.api("POST", "/api/records/find", json={})
    assert status == 401


async def test_public_url_defines_the_audience(make_sandbox: SandboxFactory) -> None:
    sandbox = await make_sandbox(public_url="https://sandbox.example:8443/")
    # The host the client actually used is not the public URL: refused.
    derived = await sandbox.token("de")
    async with sandbox.session.post(
        sandbox.url("/de/api/records/find"), json={}, headers={"Authorization": f"Bearer {derived}"}
    ) as resp:
        assert resp.status == 401
    public = "https://sandbox.example:8443/de"
    async with sandbox.session.post(
        sandbox.url(TOKEN_PATH),
        data=sandbox.token_form(audience=f"{public} {public}"),
        headers=GOOD_AUTH,
    ) as resp:
        token = (await resp.json())["access_token"]
    async with sandbox.session.post(
        sandbox.url("/de/api/records/find"), json={}, headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        assert resp.status == 200


async def test_unknown_paths_give_404_in_errors_shape(sandbox: Sandbox) -> None:
    status, body, _ = await sandbox.api("GET", "/api/nothing-here")
    assert status == 404
    assert_api_error(body, "Not Found", "")
    # Under a country the token is checked first, as behind a gateway.
    async with sandbox.session.get(sandbox.url("/de/api/nothing-here")) as resp:
        assert resp.status == 401
    async with sandbox.session.get(sandbox.url("/nowhere")) as resp:
        assert resp.status == 404
        assert_api_error(await resp.json(), "Not Found", "")
    status, body, resp = await sandbox.api("GET", "/api/records")
    assert status == 405
    assert "POST" in resp.headers["Allow"]
    assert_api_error(body, "Method Not Allowed", "")


# --------------------------------------------------------------------------- records


async def test_create_then_overwrite_bumps_version(sandbox: Sandbox) -> None:
    created = await sandbox.create(record_key="k1", country="de", key1="a", body="v1", range_key1=5)
    assert created["version"] == 1
    assert created["record_key"] == "k1"
    assert created["country"] == "de"
    assert created["key1"] == "a"
    assert created["range_key1"] == 5
    assert created["created_at"] == created["updated_at"] == iso(START)

    sandbox.clock.advance(60)
    updated = await sandbox.create(record_key="k1", body="v2")
    assert updated["version"] == 2
    assert updated["created_at"] == iso(START)
    assert updated["updated_at"] == iso(START + 60)
    assert updated["body"] == "v2"
    assert "key1" not in updated  # an overwrite replaces the whole record
    assert sandbox.state.writes == 2
    assert len(sandbox.state.records["de"]) == 1


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"key1": "a"}, "record_key"),
        ({"record_key": ""}, "record_key"),
        ({"record_key": 7}, "record_key"),
        ({"record_key": "k", "country": "DE"}, "country"),
        ({"record_key": "k", "country": "au"}, "country"),
        ({"record_key": "k", "range_key1": "5"}, "range_key1"),
        ({"record_key": "k", "range_key2": True}, "range_key2"),
        ({"record_key": "k", "key3": 3}, "key3"),
        ({"record_key": "k", "service_key6": "x"}, "service_key6"),
        ({"record_key": "k", "colour": "red"}, "colour"),
        (["record_key", "k"], "object"),
    ],
)
async def test_invalid_records_are_refused(sandbox: Sandbox, payload: Any, fragment: str) -> None:
    status, body, _ = await sandbox.api("POST", "/api/records", json=payload)
    assert status == 400
    assert_api_error(body, "Bad Request", fragment)
    assert sandbox.state.records.get("de", {}) == {}
    assert sandbox.state.writes == 0


async def test_record_bodies_must_be_json(sandbox: Sandbox) -> None:
    status, body, _ = await sandbox.api(
        "POST", "/api/records", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert status == 400
    assert_api_error(body, "Bad Request", "JSON")
    status, body, _ = await sandbox.api("POST", "/api/records", data=b"record_key=k")
    assert status == 415


async def _seed(sandbox: Sandbox) -> None:
    rows = [
        ("r1", "a", 1),
        ("r2", "b", 2),
        ("r3", "a", 3),
        ("r4", "c", 4),
        ("r5", "b", 5),
    ]
    for key, key1, rk in rows:
        await sandbox.create(record_key=key, key1=key1, range_key1=rk)


async def _find(sandbox: Sandbox, query: dict[str, Any], cc: str = "de") -> tuple[int, Any]:
    status, body, _ = await sandbox.api("POST", "/api/records/find", cc, json=query)
    return status, body


@pytest.mark.parametrize(
    ("filter_", "expected"),
    [
        ({}, ["r1", "r2", "r3", "r4", "r5"]),
        ({"key1": "a"}, ["r1", "r3"]),
        ({"key1": ["a", "c"]}, ["r1", "r3", "r4"]),
        ({"key1": {"$not": "a"}}, ["r2", "r4", "r5"]),
        ({"range_key1": [1, 5]}, ["r1", "r5"]),
        ({"range_key1": {"$gt": 2}}, ["r3", "r4", "r5"]),
        ({"range_key1": {"$gte": 2, "$lt": 4}}, ["r2", "r3"]),
        ({"range_key1": {"$lte": 2}}, ["r1", "r2"]),
        ({"range_key1": {"$not": [1, 2, 3]}}, ["r4", "r5"]),
        ({"key1": "b", "range_key1": {"$gt": 2}}, ["r5"]),
        ({"record_key": "r4"}, ["r4"]),
        ({"key2": None}, ["r1", "r2", "r3", "r4", "r5"]),
        ({"key1": "zzz"}, []),
    ],
)
async def test_find_filters(sandbox: Sandbox, filter_: dict[str, Any], expected: list[str]) -> None:
    await _seed(sandbox)
    status, body = await _find(sandbox, {"country": "de", "filter": filter_})
    assert status == 200
    assert [r["record_key"] for r in body["data"]] == expected
    assert body["meta"] == {
        "count": len(expected),
        "limit": 100,
        "offset": 0,
        "total": len(expected),
    }
    for record in body["data"]:
        assert {"version", "created_at", "updated_at"} <= set(record)


async def test_find_pagination_and_stable_order(sandbox: Sandbox) -> None:
    await _seed(sandbox)
    await sandbox.create(record_key="r2", key1="b", range_key1=2)  # overwrite keeps its place
    status, body = await _find(sandbox, {"filter": {}, "options": {"limit": 2, "offset": 1}})
    assert status == 200
    assert [r["record_key"] for r in body["data"]] == ["r2", "r3"]
    assert body["data"][0]["version"] == 2
    assert body["meta"] == {"count": 2, "limit": 2, "offset": 1, "total": 5}
    status, body = await _find(sandbox, {"options": {"limit": 100, "offset": 10}})
    assert status == 200
    assert body["data"] == []
    assert body["meta"] == {"count": 0, "limit": 100, "offset": 10, "total": 5}


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ({"options": {"limit": 101}}, "limit"),
        ({"options": {"limit": 0}}, "limit"),
        ({"options": {"limit": "10"}}, "limit"),
        ({"options": {"offset": -1}}, "offset"),
        ({"options": {"sort": [{"key1": "asc"}]}}, "sort"),
        ({"filter": {"body": "x"}}, "body"),
        ({"filter": {"key1": {"$gt": "a"}}}, "key1"),
        ({"filter": {"range_key1": {"$between": [1, 2]}}}, "$between"),
        ({"filter": {"range_key1": "1"}}, "integer"),
        ({"filter": {"range_key1": {"$not": 1, "$gt": 0}}}, "$not"),
        ({"filter": []}, "filter"),
        ({"country": "au"}, "country"),
        ({"flter": {}}, "flter"),
    ],
)
async def test_find_rejects_bad_queries(sandbox: Sandbox, query: dict[str, Any], fragment: str) -> None:
    status, body = await _find(sandbox, query)
    assert status == 400
    assert_api_error(body, "Bad Request", fragment)


async def test_records_are_per_country(sandbox: Sandbox) -> None:
    await sandbox.create("de", record_key="shared", key1="de-value")
    status, body = await _find(sandbox, {"filter": {"record_key": "shared"}}, cc="au")
    assert status == 200
    assert body["meta"]["total"] == 0
    await sandbox.create("au", record_key="shared", key1="au-value")
    _, body = await _find(sandbox, {"filter": {"record_key": "shared"}}, cc="de")
    assert [r["key1"] for r in body["data"]] == ["de-value"]
    assert body["data"][0]["version"] == 1


async def test_delete_record(sandbox: Sandbox) -> None:
    await sandbox.create(record_key="gone")
    status, body, _ = await sandbox.api("DELETE", "/api/records/au/gone")
    assert status == 400
    assert_api_error(body, "Bad Request", "country")
    status, body, _ = await sandbox.api("DELETE", "/api/records/de/gone")
    assert status == 204
    assert body == b""
    _, found = await _find(sandbox, {"filter": {"record_key": "gone"}})
    assert found["meta"]["total"] == 0
    status, body, _ = await sandbox.api("DELETE", "/api/records/de/gone")
    assert status == 404
    assert_api_error(body, "Not Found", "record")


# --------------------------------------------------------------------------- files


def _file_form(data: bytes, filename: str = "scan.pdf", mime: str = "application/pdf") -> FormData:
    form = FormData()
    form.add_field("note", "ignored")
    form.add_field("file", data, filename=filename, content_type=mime)
    return form


async def test_file_upload_download_round_trip(sandbox: Sandbox) -> None:
    await sandbox.create(record_key="rec")
    data = os.urandom(300 * 1024 + 7)  # several read chunks, odd length
    status, meta, _ = await sandbox.api(
        "POST", "/webapi/records/rec/files", data=_file_form(data, "scan-2024.pdf")
    )
    assert status == 201, meta
    assert meta["size"] == len(data)
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["filename"] == "scan-2024.pdf"
    assert meta["mime_type"] == "application/pdf"
    assert meta["file_id"]

    status, downloaded, resp = await sandbox.api("GET", f"/webapi/records/rec/files/{meta['file_id']}")
    assert status == 200
    assert downloaded == data
    assert resp.headers["Content-Type"] == "application/pdf"
    disposition = resp.headers["Content-Disposition"]
    assert disposition.startswith("attachment;")
    assert 'filename="scan-2024.pdf"' in disposition
    assert sandbox.state.writes == 2  # the record and the file


def test_content_disposition_escapes_awkward_names() -> None:
    value = content_disposition('résumé "final".pdf')
    assert value == (
        "attachment; filename=\"r_sum_ _final_.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%22final%22.pdf"
    )


async def test_x_filename_header_overrides_part_name(sandbox: Sandbox) -> None:
    await sandbox.create(record_key="rec")
    status, meta, _ = await sandbox.api(
        "POST",
        "/webapi/records/rec/files",
        data=_file_form(b"hello", "part-name.txt", "text/plain"),
        headers={"x-filename": "header-name.txt"},
    )
    assert status == 201
    assert meta["filename"] == "header-name.txt"
    _, _, resp = await sandbox.api("GET", f"/webapi/records/rec/files/{meta['file_id']}")
    assert 'filename="header-name.txt"' in resp.headers["Content-Disposition"]


async def test_upload_to_missing_record_is_404(sandbox: Sandbox) -> None:
    status, body, _ = await sandbox.api("POST", "/webapi/records/nope/files", data=_file_form(b"data"))
    assert status == 404
    assert_api_error(body, "Not Found", "record")
    assert sandbox.state.files == {}
    assert sandbox.state.writes == 0


async def test_oversize_upload_is_413(make_sandbox: SandboxFactory) -> None:
    sandbox = await make_sandbox(max_file_size=1024)
    await sandbox.create(record_key="rec")
    status, body, _ = await sandbox.api("POST", "/webapi/records/rec/files", data=_file_form(b"x" * 4096))
    assert status == 413
    assert_api_error(body, "Request Entity Too Large", "1024")
    assert sandbox.state.files.get("de", {}).get("rec", {}) == {}
    # Exactly at the limit is fine.
    status, meta, _ = await sandbox.api("POST", "/webapi/records/rec/files", data=_file_form(b"y" * 1024))
    assert status == 201
    assert meta["size"] == 1024


async def test_upload_without_file_part_and_download_misses(sandbox: Sandbox) -> None:
    await sandbox.create(record_key="rec")
    form = FormData()
    form.add_field("other", b"data", filename="a.bin")
    status, body, _ = await sandbox.api("POST", "/webapi/records/rec/files", data=form)
    assert status == 400
    assert_api_error(body, "Bad Request", "'file'")
    status, body, _ = await sandbox.api("GET", "/webapi/records/rec/files/unknown-id")
    assert status == 404
    assert_api_error(body, "Not Found", "file")


async def test_deleting_a_record_deletes_its_files(sandbox: Sandbox) -> None:
    await sandbox.create(record_key="rec")
    _, meta, _ = await sandbox.api("POST", "/webapi/records/rec/files", data=_file_form(b"abc"))
    status, _, _ = await sandbox.api("DELETE", "/api/records/de/rec")
    assert status == 204
    status, _, _ = await sandbox.api("GET", f"/webapi/records/rec/files/{meta['file_id']}")
    assert status == 404


async def test_file_endpoints_need_a_token(sandbox: Sandbox) -> None:
    await sandbox.create(record_key="rec")
    async with sandbox.session.post(
        sandbox.url("/de/webapi/records/rec/files"), data=_file_form(b"abc")
    ) as resp:
        assert resp.status == 401
    assert sandbox.state.files == {}


# --------------------------------------------------------------------------- control, stats, logs


async def test_stats_counts_and_never_reveals_secrets(sandbox: Sandbox) -> None:
    async with sandbox.session.post(
        sandbox.url("/idp/oauth2/token/"), data=sandbox.token_form(scope="bad"), headers=GOOD_AUTH
    ) as resp:
        assert resp.status == 400
    await sandbox.create(record_key="k1")  # token request 2, api request 1
    await sandbox.create(record_key="k2")  # api request 2
    async with sandbox.session.post(sandbox.url("/de/api/records/find"), json={}) as resp:
        assert resp.status == 401  # api request 3
    await sandbox.create("au", record_key="k3")  # token request 3, api request 4

    async with sandbox.session.get(sandbox.url("/_sandbox/stats")) as resp:
        assert resp.status == 200
        text = await resp.text()
        stats = await resp.json()
    assert stats["token_requests"] == 3
    assert stats["token_requests_by_path"] == {"/idp/oauth2/token/": 1, TOKEN_PATH: 2}
    assert stats["api_requests"] == 4
    assert stats["unauthorized"] == 1
    assert stats["writes"] == 3
    assert stats["records"] == {"au": 1, "de": 2}
    assert len(sandbox.state.issued_tokens) == 2
    for secret in [*sandbox.state.issued_tokens, DEFAULT_CLIENT.client_secret]:
        assert secret not in text
        assert secret not in repr(sandbox.state)
    # Reading stats is not REST API traffic.
    assert sandbox.state.api_requests == 4


async def test_reset_clears_state(sandbox: Sandbox) -> None:
    await sandbox.create(record_key="k1")
    old_token = sandbox.state.issued_tokens[0]
    async with sandbox.session.post(sandbox.url("/_sandbox/reset")) as resp:
        assert resp.status == 200
    state = sandbox.state
    assert (state.token_requests, state.api_requests, state.writes) == (0, 0, 0)
    assert state.records == {}
    assert state.files == {}
    assert state.issued_tokens == [old_token]  # kept on purpose, for leak scans
    status, body, _ = await sandbox.api("POST", "/api/records/find", json={})
    assert status == 401
    assert_api_error(body, "Unauthorized", "unknown")


@pytest.mark.parametrize(
    ("remote", "expected"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("2001:db8::1", False),
        ("", False),
        (None, False),
        ("not-an-ip", False),
    ],
)
def test_is_loopback(remote: str | None, expected: bool) -> None:
    assert is_loopback(remote) is expected


async def test_control_endpoints_refuse_non_loopback_peers(make_sandbox: SandboxFactory) -> None:
    @web.middleware
    async def from_afar(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # Pretend the peer is a LAN host: the sandbox sees request.remote only.
        return await handler(request.clone(remote="192.0.2.10"))

    def hook(app: web.Application) -> None:
        app.middlewares.insert(0, from_afar)

    sandbox = await make_sandbox(app_hook=hook)
    sandbox.state.writes = 42
    for method, path in [
        ("GET", "/_sandbox/stats"),
        ("POST", "/_sandbox/reset"),
        ("POST", "/_sandbox/tokens/revoke"),
    ]:
        async with sandbox.session.request(method, sandbox.url(path)) as resp:
            assert resp.status == 403
            assert_api_error(await resp.json(), "Forbidden", "loopback")
    assert sandbox.state.writes == 42  # reset did not run


async def test_logs_one_line_per_request_without_secrets(sandbox: Sandbox) -> None:
    with capture_logs() as logs:
        token = await sandbox.token("de")
        await sandbox.session.post(
            sandbox.url("/de/api/records"),
            json={"record_key": "k"},
            headers={"Authorization": f"Bearer {token}"},
        )
        await sandbox.session.post(
            sandbox.url("/de/api/records"),
            json={"record_key": "k"},
            headers={"Authorization": "Bearer forged-token-value"},
        )
    lines = [e for e in logs if e["event"] == "sandbox request"]
    assert [(e["method"], e["path"], e["status"]) for e in lines] == [
        ("POST", TOKEN_PATH, 200),
        ("POST", "/de/api/records", 201),
        ("POST", "/de/api/records", 401),
    ]
    dump = repr(logs)
    for secret in (token, "forged-token-value", DEFAULT_CLIENT.client_secret):
        assert secret not in dump


async def test_run_sandbox_serves_until_cancelled(session: ClientSession) -> None:
    with capture_logs() as logs:
        task = asyncio.create_task(run_sandbox(SandboxSettings(port=0)))
        listening: MutableMapping[str, Any] = {}
        for _ in range(200):
            found = [e for e in logs if e["event"] == "sandbox listening"]
            if found:
                listening = found[0]
                break
            assert not task.done(), task
            await asyncio.sleep(0.01)
        assert listening, "run_sandbox never logged 'sandbox listening'"
        url = listening["url"]
        assert url.startswith("http://127.0.0.1:")
        assert not url.endswith(":0")
        assert listening["token_url"] == f"{url}/oauth2/token/"
        assert listening["restapi_url"] == f"{url}/de"

        r = listening["restapi_url"]
        form = {"grant_type": "client_credentials", "scope": "sandbox-env", "audience": f"{r} {r}"}
        async with session.post(listening["token_url"], data=form, headers=GOOD_AUTH) as resp:
            assert resp.status == 200
        async with session.get(f"{url}/_sandbox/stats") as resp:
            assert (await resp.json())["token_requests"] == 1

        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    with pytest.raises(aiohttp.ClientConnectionError):
        async with ClientSession() as fresh, fresh.get(f"{url}/_sandbox/stats"):
            pass
