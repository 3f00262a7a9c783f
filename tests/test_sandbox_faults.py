"""Fault injection in the sandbox (proxy.sandbox.faults / inject), over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientSession, FormData, encode_basic_auth
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs

from proxy.sandbox import DEFAULT_CLIENT, SANDBOX_STATE, SandboxSettings, SandboxState, build_sandbox_app
from proxy.sandbox.faults import Faults, FaultSpecError, RestApiFaults, TokenFaults, TokenMode
from tests.conftest import ManualClock

START = 1_700_000_000.0
GOOD_AUTH = {"Authorization": encode_basic_auth(DEFAULT_CLIENT.client_id, DEFAULT_CLIENT.client_secret)}
TOKEN_PATH = "/oauth2/token/"
IDP_PATH = "/idp/oauth2/token/"
EMEA_PATH = "/emea/oauth2/token/"


@dataclass
class Box:
    """A running sandbox, a client session and a hand-moved clock."""

    server: TestServer
    session: ClientSession
    clock: ManualClock

    @property
    def state(self) -> SandboxState:
        return self.server.app[SANDBOX_STATE]

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    def token_form(self, cc: str = "de") -> dict[str, str]:
        r = self.url(f"/{cc}")
        return {
            "grant_type": "client_credentials",
            "scope": DEFAULT_CLIENT.environment_id,
            "audience": f"{r} {r}",
        }

    def post_token(self, path: str = TOKEN_PATH, cc: str = "de") -> Any:
        return self.session.post(self.url(path), data=self.token_form(cc), headers=GOOD_AUTH)

    async def token_json(self, path: str = TOKEN_PATH) -> dict[str, Any]:
        async with self.post_token(path) as resp:
            assert resp.status == 200, resp.status
            body: dict[str, Any] = await resp.json()
            return body

    async def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {(await self.token_json())['access_token']}"}

    async def put_faults(self, spec: Any) -> tuple[int, Any]:
        async with self.session.put(self.url("/_sandbox/faults"), json=spec) as resp:
            return resp.status, await resp.json()

    async def find(self, headers: dict[str, str]) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.session.post(self.url("/de/api/records/find"), json={}, headers=headers) as resp:
            return resp.status, await resp.json(), resp

    async def upload(self, headers: dict[str, str], data: bytes) -> str:
        async with self.session.post(
            self.url("/de/api/records"), json={"record_key": "rec"}, headers=headers
        ) as resp:
            assert resp.status == 201
        form = FormData()
        form.add_field("file", data, filename="blob.bin", content_type="application/octet-stream")
        async with self.session.post(
            self.url("/de/webapi/records/rec/files"), data=form, headers=headers
        ) as resp:
            assert resp.status == 201
            file_id: str = (await resp.json())["file_id"]
        return file_id


@pytest.fixture
async def session() -> AsyncIterator[ClientSession]:
    async with ClientSession() as s:
        yield s


@pytest.fixture
async def box(aiohttp_server: AiohttpServer, session: ClientSession) -> Box:
    clock = ManualClock(START)
    app = build_sandbox_app(SandboxSettings(expires_in=300), clock)
    return Box(await aiohttp_server(app), session, clock)


# --------------------------------------------------------------------------- model and control API


def test_parse_round_trips_and_defaults() -> None:
    spec = {
        "token": {"mode": "down", "paths": [IDP_PATH], "delay": 0.5},
        "restapi": {
            "unauthorized": 2,
            "delay": 1,
            "status": 503,
            "status_count": 3,
            "throttle_bytes_per_second": 1000000,
            "die_after_bytes": 100000,
        },
    }
    faults = Faults.parse(spec)
    assert faults.token == TokenFaults(mode=TokenMode.DOWN, paths=(IDP_PATH,), delay=0.5)
    assert faults.restapi == RestApiFaults(2, 1.0, 503, 3, 1_000_000.0, 100_000)
    assert Faults.parse(faults.to_json()) == faults
    assert Faults.parse({}) == Faults.parse(None) == Faults()
    assert not Faults().active and faults.active
    assert Faults().to_json()["token"] == {"mode": None, "paths": None, "delay": 0.0, "status": 503}
    with pytest.raises(FaultSpecError):
        TokenFaults(delay=-1)


@pytest.mark.parametrize(
    ("spec", "source", "fragment"),
    [
        ({"tokens": {}}, "body.tokens", "unknown key"),
        ({"token": {"mood": "down"}}, "body.token.mood", "unknown key"),
        ({"token": {"mode": "sideways"}}, "body.token.mode", "unknown token.mode"),
        ({"token": {"mode": 3}}, "body.token.mode", "unknown token.mode"),
        ({"token": {"delay": True}}, "body.token.delay", "number"),
        ({"token": {"delay": -0.1}}, "body.token.delay", "seconds"),
        ({"token": {"status": 200}}, "body.token.status", "400 to 599"),
        ({"token": {"paths": ["/de/api/records"]}}, "body.token.paths", "not a token path"),
        ({"token": {"paths": []}}, "body.token.paths", "empty"),
        ({"token": []}, "body.token", "object"),
        ({"restapi": {"unauthorized": 1.5}}, "body.restapi.unauthorized", "integer"),
        ({"restapi": {"unauthorized": -1}}, "body.restapi.unauthorized", "negative"),
        ({"restapi": {"status_count": 2}}, "body.restapi.status_count", "needs restapi.status"),
        ({"restapi": {"status": 99}}, "body.restapi.status", "400 to 599"),
        ({"restapi": {"throttle_bytes_per_second": 0}}, "body.restapi.throttle_bytes_per_second", "positive"),
        ({"restapi": {"die_after_bytes": "10"}}, "body.restapi.die_after_bytes", "integer"),
        (["down"], "body", "object"),
    ],
)
async def test_put_faults_validates_strictly(box: Box, spec: Any, source: str, fragment: str) -> None:
    assert (await box.put_faults({"restapi": {"unauthorized": 1}}))[0] == 200
    status, body = await box.put_faults(spec)
    assert status == 400
    (error,) = body["errors"]
    assert error["source"] == source
    assert fragment in error["detail"], error
    assert box.state.faults.restapi.unauthorized == 1  # unchanged by a refused PUT


async def test_put_faults_refuses_non_json(box: Box) -> None:
    async with box.session.put(box.url("/_sandbox/faults"), data=b"{mode: down") as resp:
        assert resp.status == 400
        assert "JSON" in (await resp.json())["errors"][0]["detail"]


async def test_put_get_delete_and_reset(box: Box) -> None:
    status, body = await box.put_faults(
        {"token": {"mode": "error", "status": 500}, "restapi": {"delay": 0.01}}
    )
    assert status == 200
    assert body["token"] == {"mode": "error", "paths": None, "delay": 0.0, "status": 500}
    async with box.session.get(box.url("/_sandbox/faults")) as resp:
        assert await resp.json() == body
    async with box.session.get(box.url("/_sandbox/stats")) as resp:
        assert (await resp.json())["faults_active"] is True

    async with box.session.delete(box.url("/_sandbox/faults")) as resp:
        assert resp.status == 200
        assert await resp.json() == Faults().to_json()
    assert box.state.faults == Faults()
    assert (await box.token_json())["token_type"] == "bearer"

    await box.put_faults({"token": {"mode": "error"}})
    async with box.session.post(box.url("/_sandbox/reset")) as resp:
        assert resp.status == 200
    assert box.state.faults == Faults()


async def test_python_interface(box: Box) -> None:
    box.state.set_faults({"token": {"mode": "error", "status": 502}})
    async with box.post_token() as resp:
        assert resp.status == 502
    box.state.faults = Faults(restapi=RestApiFaults(status=418, status_count=1))
    status, _, _ = await box.find({})
    assert status == 418
    with pytest.raises(ValueError, match=r"unknown token\.mode"):
        box.state.set_faults({"token": {"mode": "nope"}})
    box.state.clear_faults()
    assert box.state.faults == Faults()


# --------------------------------------------------------------------------- token endpoint


async def test_token_down_drops_the_connection(box: Box) -> None:
    box.state.set_faults({"token": {"mode": "down"}})
    with capture_logs() as logs:
        with pytest.raises(aiohttp.ClientConnectionError):
            async with box.post_token() as resp:
                await resp.read()
    assert box.state.token_requests == 1
    assert box.state.token_requests_by_path == {TOKEN_PATH: 1}
    assert box.state.tokens == {}
    assert [e.get("fault") for e in logs if e["event"] == "sandbox request"] == ["token.down"]


@pytest.mark.parametrize(("status", "expected"), [(None, 503), (500, 500), (429, 429)])
async def test_token_error_answers_server_error(box: Box, status: int | None, expected: int) -> None:
    token: dict[str, Any] = {"mode": "error"}
    if status is not None:
        token["status"] = status
    box.state.set_faults({"token": token})
    async with box.post_token() as resp:
        assert resp.status == expected
        assert resp.headers["Cache-Control"] == "no-store"
        body = await resp.json()
    assert body["error"] == "server_error"
    assert body["status_code"] == expected
    assert box.state.tokens == {}


async def test_token_empty_and_malformed_bodies(box: Box) -> None:
    box.state.set_faults({"token": {"mode": "empty"}})
    async with box.post_token() as resp:
        assert resp.status == 200
        assert await resp.read() == b""
    box.state.set_faults({"token": {"mode": "malformed"}})
    async with box.post_token() as resp:
        assert resp.status == 200
        with pytest.raises(ValueError):
            await resp.json()
    assert box.state.token_requests == 2
    assert box.state.tokens == {}
    assert box.state.issued_tokens == []


@pytest.mark.parametrize("mode", ["wrong_type", "no_expiry"])
async def test_token_junk_answers_carry_an_unusable_token(box: Box, mode: str) -> None:
    box.state.set_faults({"token": {"mode": mode}})
    body = await box.token_json()
    assert isinstance(body["access_token"], str) and body["access_token"]
    if mode == "wrong_type":
        assert body["token_type"] == "mac"
        assert body["expires_in"] == 300
    else:
        assert body["token_type"] == "bearer"
        assert "expires_in" not in body
    # Scanned for leaks, but not usable.
    assert box.state.issued_tokens == [body["access_token"]]
    assert box.state.tokens == {}
    box.state.clear_faults()
    status, _, resp = await box.find({"Authorization": f"Bearer {body['access_token']}"})
    assert status == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


async def test_junk_modes_still_check_the_request(box: Box) -> None:
    box.state.set_faults({"token": {"mode": "wrong_type"}})
    async with box.session.post(box.url(TOKEN_PATH), data=box.token_form(), headers={}) as resp:
        assert resp.status == 401
    assert box.state.issued_tokens == []


async def test_same_token_until_it_expires(box: Box) -> None:
    first = await box.token_json()  # issued before the fault: still reused
    box.state.set_faults({"token": {"mode": "same_token"}})
    box.clock.now += 100.5
    again = await box.token_json()
    assert again["access_token"] == first["access_token"]
    assert again["expires_in"] == 200  # 199.5 s left, rounded up
    box.clock.now += 199.4
    assert (await box.token_json())["expires_in"] == 1
    assert box.state.issued_tokens == [first["access_token"]]

    box.clock.now += 0.1  # expired now
    fresh = await box.token_json()
    assert fresh["access_token"] != first["access_token"]
    assert fresh["expires_in"] == 300
    assert box.state.issued_tokens == [first["access_token"], fresh["access_token"]]
    # Another audience gets its own token.
    async with box.post_token(cc="au") as resp:
        assert (await resp.json())["access_token"] != fresh["access_token"]
    assert box.state.token_requests == 5


async def test_same_token_skips_revoked_tokens(box: Box) -> None:
    box.state.set_faults({"token": {"mode": "same_token"}})
    first = await box.token_json()
    box.state.revoke_all_tokens()
    assert (await box.token_json())["access_token"] != first["access_token"]


async def test_paths_limit_token_faults(box: Box) -> None:
    await box.put_faults({"token": {"mode": "error", "paths": [IDP_PATH]}})
    async with box.post_token(IDP_PATH) as resp:
        assert resp.status == 503
    async with box.post_token(EMEA_PATH) as resp:
        assert resp.status == 200
    async with box.post_token(IDP_PATH.rstrip("/")) as resp:
        assert resp.status == 200  # paths match exactly
    assert box.state.token_requests_by_path == {IDP_PATH: 1, EMEA_PATH: 1, IDP_PATH.rstrip("/"): 1}


async def test_token_delay(box: Box) -> None:
    box.state.set_faults({"token": {"delay": 0.3}})
    started = time.monotonic()
    body = await box.token_json()
    assert time.monotonic() - started >= 0.3
    assert body["access_token"] in box.state.tokens


# --------------------------------------------------------------------------- REST API


async def test_unauthorized_counts_down_then_normal_service(box: Box) -> None:
    headers = await box.bearer()
    await box.put_faults({"restapi": {"unauthorized": 2}})
    for remaining in (1, 0):
        async with box.session.post(
            box.url("/de/api/records"), json={"record_key": "k"}, headers=headers
        ) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
            (error,) = (await resp.json())["errors"]
            assert error["title"] == "Unauthorized"
        assert box.state.faults.restapi.unauthorized == remaining
    assert box.state.writes == 0  # no handler ran
    async with box.session.post(
        box.url("/de/api/records"), json={"record_key": "k"}, headers=headers
    ) as resp:
        assert resp.status == 201
    assert (box.state.unauthorized, box.state.api_requests, box.state.writes) == (2, 3, 1)


async def test_status_count_then_normal_service(box: Box) -> None:
    headers = await box.bearer()
    await box.put_faults({"restapi": {"status": 503, "status_count": 2}})
    for _ in range(2):
        status, body, _ = await box.find(headers)
        assert status == 503
        assert body["errors"][0]["title"] == "Service Unavailable"
    assert (await box.find(headers))[0] == 200
    assert box.state.faults.restapi.status_count == 0


async def test_status_without_count_persists(box: Box) -> None:
    headers = await box.bearer()
    box.state.set_faults({"restapi": {"status": 502}})
    assert [(await box.find(headers))[0] for _ in range(3)] == [502, 502, 502]
    box.state.clear_faults()
    assert (await box.find(headers))[0] == 200


async def test_delay_and_in_flight_counters(box: Box) -> None:
    headers = await box.bearer()
    box.state.set_faults({"restapi": {"delay": 0.4}})
    started = time.monotonic()
    calls = [asyncio.create_task(box.find(headers)) for _ in range(3)]
    while box.state.restapi_in_flight < 3 and time.monotonic() - started < 0.35:
        await asyncio.sleep(0.01)
    assert box.state.restapi_in_flight == 3
    assert box.state.open_connections() == 3
    statuses = [(await c)[0] for c in calls]
    assert statuses == [200, 200, 200]
    assert time.monotonic() - started >= 0.4
    async with box.session.get(box.url("/_sandbox/stats")) as resp:
        stats = await resp.json()
    assert stats["restapi_in_flight"] == 0
    assert stats["restapi_in_flight_max"] == 3
    assert stats["restapi_connections_max"] == 3
    assert stats["restapi_open_connections"] <= 3

    async with box.session.post(box.url("/_sandbox/reset")) as resp:
        assert resp.status == 200
    assert box.state.restapi_in_flight_max == 0


async def test_throttled_download(box: Box) -> None:
    headers = await box.bearer()
    data = os.urandom(150_000)
    file_id = await box.upload(headers, data)
    box.state.set_faults({"restapi": {"throttle_bytes_per_second": 300_000}})  # about 0.5 s
    started = time.monotonic()
    async with box.session.get(box.url(f"/de/webapi/records/rec/files/{file_id}"), headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(data))
        assert resp.headers["Content-Type"] == "application/octet-stream"
        first = await resp.content.readany()
        assert box.state.restapi_in_flight == 1  # still streaming
        received = first + await resp.read()
    elapsed = time.monotonic() - started
    assert received == data
    assert 0.4 <= elapsed < 1.5, elapsed
    assert box.state.restapi_in_flight == 0


async def test_die_after_bytes_truncates_the_download(box: Box) -> None:
    headers = await box.bearer()
    data = os.urandom(200_000)
    file_id = await box.upload(headers, data)
    box.state.set_faults({"restapi": {"die_after_bytes": 50_000}})
    got = bytearray()
    async with box.session.get(box.url(f"/de/webapi/records/rec/files/{file_id}"), headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(data))
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in resp.content.iter_any():
                got.extend(chunk)
    assert bytes(got) == data[:50_000]
    assert box.state.restapi_in_flight == 0

    box.state.clear_faults()  # downloads are whole again
    async with box.session.get(box.url(f"/de/webapi/records/rec/files/{file_id}"), headers=headers) as resp:
        assert await resp.read() == data
