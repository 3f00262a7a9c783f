"""A bad day, over real sockets with the sandbox's fault switches: token outages, upstream
401s, quotas, slow and dying peers, disconnecting clients and SIGTERM."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import PROBLEM, ProxyProcess, RunningProxy, RunningSandbox, config_dict, problem

StartProxy = Callable[..., Awaitable[RunningProxy]]
FIND = {"filter": {}, "options": {"limit": 10}}


async def find(http: aiohttp.ClientSession, proxy: RunningProxy | ProxyProcess, cc: str = "de") -> int:
    async with http.post(f"{proxy.url}/{cc}/api/records/find", json=FIND) as r:
        await r.read()
        return r.status


async def proxy_status(http: aiohttp.ClientSession, proxy: RunningProxy) -> dict[str, Any]:
    async with http.get(f"{proxy.url}/_proxy/status") as r:
        return dict(await r.json())


# --- token lifecycle under failure ---------------------------------------------------------


async def test_auth_server_down_then_back_recovers_without_forwarding_unauthenticated(
    proxy: RunningProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    sandbox.state.set_faults({"token": {"mode": "down"}})
    for _ in range(5):
        async with http.post(f"{proxy.url}/de/api/records/find", json=FIND) as r:
            doc = await problem(r, 503)
            assert int(r.headers["Retry-After"]) >= 1
        assert doc["hop"] == "token_server"
    # The negative cache spared the dead server most of those requests.
    assert sandbox.state.token_requests <= 4  # 2 token URLs x at most 2 attempts
    assert sandbox.state.api_requests == 0

    sandbox.state.set_faults({})
    deadline = time.monotonic() + 10
    statuses = []
    while time.monotonic() < deadline:
        statuses.append(await find(http, proxy))
        if statuses[-1] == 200:
            break
        await asyncio.sleep(0.1)
    assert statuses[-1] == 200
    assert set(statuses) <= {200, 503}
    # Nothing ever reached the REST API without a valid token.
    assert sandbox.state.unauthorized == 0
    assert sandbox.state.api_requests == statuses.count(200)


async def test_first_token_url_down_second_serves(
    proxy: RunningProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    sandbox.state.set_faults({"token": {"mode": "down", "paths": ["/idp/oauth2/token/"]}})
    assert await find(http, proxy) == 200
    assert sandbox.state.token_requests_by_path == {"/idp/oauth2/token/": 1, "/emea/oauth2/token/": 1}


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("empty", "not JSON"),
        ("malformed", "not JSON"),
        ("wrong_type", "not bearer"),
        ("no_expiry", "expires_in"),
        ("error", "HTTP 503"),
    ],
)
async def test_bad_token_answers_fail_over_then_fail_cleanly(
    start_proxy: StartProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession, mode: str, reason: str
) -> None:
    # Only the first URL misbehaves: the second one serves.
    proxy = await start_proxy(config_dict(sandbox))
    sandbox.state.set_faults({"token": {"mode": mode, "paths": ["/idp/oauth2/token/"]}})
    assert await find(http, proxy) == 200

    # Both misbehave: 503, saying why, never a request without a token.
    other = await start_proxy(config_dict(sandbox))
    sandbox.state.set_faults({"token": {"mode": mode}})
    async with http.post(f"{other.url}/de/api/records/find", json=FIND) as r:
        doc = await problem(r, 503)
    assert reason in doc["detail"]
    assert sandbox.state.unauthorized == 0


async def test_same_token_handed_back_does_not_spin(
    start_sandbox: Callable[..., Awaitable[RunningSandbox]],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
) -> None:
    sandbox = await start_sandbox(expires_in=3)
    sandbox.state.set_faults({"token": {"mode": "same_token"}})
    proxy = await start_proxy(config_dict(sandbox))
    statuses = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        statuses.append(await find(http, proxy))
        await asyncio.sleep(0.02)
    assert sandbox.state.unauthorized == 0  # the first expiry held; no expired token injected
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) > len(statuses) * 0.7
    # Two token lifetimes: a handful of fetches, not one per request.
    assert sandbox.state.token_requests <= 8, sandbox.state.token_requests


# --- upstream 401 -----------------------------------------------------------------------------


async def test_401_on_buffered_post_is_replayed_once_with_one_write(
    proxy: RunningProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    assert await find(http, proxy) == 200
    sandbox.state.set_faults({"restapi": {"unauthorized": 1}})
    async with http.post(f"{proxy.url}/de/api/records", json={"record_key": "r401"}) as r:
        assert r.status == 201
    assert sandbox.state.unauthorized == 1
    assert sandbox.state.writes == 1
    assert len(sandbox.state.records["de"]) == 1
    assert sandbox.state.token_requests == 2  # the rejected token was replaced


async def test_401_twice_is_not_replayed_twice(
    proxy: RunningProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    assert await find(http, proxy) == 200
    before = sandbox.state.api_requests
    sandbox.state.set_faults({"restapi": {"unauthorized": 5}})
    async with http.post(f"{proxy.url}/de/api/records", json={"record_key": "x"}) as r:
        doc = await problem(r, 401)
        assert "Bearer" in r.headers["WWW-Authenticate"]
    assert doc["hop"] == "upstream_auth" and "freshly fetched" in doc["detail"]
    assert sandbox.state.api_requests - before == 2
    assert sandbox.state.writes == 0


async def test_401_on_streamed_upload_is_not_replayed(
    proxy: RunningProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    assert await find(http, proxy) == 200
    before = sandbox.state.api_requests
    sandbox.state.set_faults({"restapi": {"unauthorized": 1}})

    async def chunked() -> AsyncIterator[bytes]:
        yield b'{"record_key": '
        yield b'"streamed"}'

    async with http.post(
        f"{proxy.url}/de/api/records", data=chunked(), headers={"Content-Type": "application/json"}
    ) as r:
        doc = await problem(r, 401)
    assert "not retried" in doc["detail"] and "streamed" in doc["detail"]
    assert doc["upstream_status"] == 401
    assert sandbox.state.api_requests - before == 1
    assert sandbox.state.writes == 0
    # The next request gets a fresh token and works.
    assert await find(http, proxy) == 200


async def test_body_larger_than_replay_buffer_is_streamed_and_not_replayed(
    start_proxy: StartProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(config_dict(sandbox, upstream={"replay_buffer_size": 10}))
    assert await find(http, proxy) == 200
    sandbox.state.set_faults({"restapi": {"unauthorized": 1}})
    async with http.post(f"{proxy.url}/de/api/records", json={"record_key": "big-enough"}) as r:
        doc = await problem(r, 401)
    assert "replay_buffer_size" in doc["detail"]


# --- quotas and slow upstreams --------------------------------------------------------------


async def test_26th_concurrent_request_waits_and_upstream_never_sees_more_than_25(
    proxy: RunningProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    assert await find(http, proxy) == 200
    sandbox.state.set_faults({"restapi": {"delay": 0.5}})
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, len(sandbox.server.runner.server.connections))  # type: ignore[union-attr]
            await asyncio.sleep(0.01)

    watcher = asyncio.ensure_future(watch())
    started = time.monotonic()
    statuses = await asyncio.gather(*(find(http, proxy) for _ in range(26)))
    elapsed = time.monotonic() - started
    watcher.cancel()
    assert statuses == [200] * 26
    assert sandbox.state.restapi_in_flight_max == 25
    assert sandbox.state.restapi_connections_max <= 25  # REST API connections the sandbox saw
    assert peak <= 25  # all TCP connections to the sandbox, token requests included
    assert elapsed >= 1.0  # the 26th waited for a connection, then ran
    status = await proxy_status(http, proxy)
    assert status["upstreams"]["DE"]["max_in_flight"] == 25


async def test_full_queue_gets_429_with_retry_after(
    start_proxy: StartProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(config_dict(sandbox, quota={"queue_timeout": 0.3}))
    assert await find(http, proxy) == 200
    sandbox.state.set_faults({"restapi": {"delay": 1.0}})

    async def one() -> tuple[int, str | None, str]:
        async with http.post(f"{proxy.url}/de/api/records/find", json=FIND) as r:
            return r.status, r.headers.get("Retry-After"), r.headers["Content-Type"]

    results = await asyncio.gather(*(one() for _ in range(26)))
    assert sorted(s for s, _, _ in results) == [200] * 25 + [429]
    (rejected,) = [r for r in results if r[0] == 429]
    assert rejected[1] is not None and int(rejected[1]) >= 1
    assert rejected[2].startswith(PROBLEM)
    assert sandbox.state.restapi_in_flight_max == 25


async def test_rate_limit_spaces_requests(
    start_proxy: StartProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(config_dict(sandbox, quota={"rate": 10, "burst": 2}))
    started = time.monotonic()
    statuses = await asyncio.gather(*(find(http, proxy) for _ in range(12)))
    assert statuses == [200] * 12
    # 2 at once, then 10 more at 10/s: about one second.
    assert time.monotonic() - started >= 0.9


async def test_first_byte_timeout_is_504_naming_it(
    start_proxy: StartProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        config_dict(
            sandbox,
            countries={"de": sandbox.restapi_url("de")},
        )
        | {
            "countries": {
                "de": {
                    "region": "emea",
                    "restapi_url": sandbox.restapi_url("de"),
                    "upstream": {"first_byte_timeout": 0.3},
                }
            }
        }
    )
    assert await find(http, proxy) == 200
    sandbox.state.set_faults({"restapi": {"delay": 2}})
    async with http.post(f"{proxy.url}/de/api/records/find", json=FIND) as r:
        doc = await problem(r, 504)
    assert doc["hop"] == "upstream_timeout" and "first_byte_timeout" in doc["detail"]


# --- clients and the process ----------------------------------------------------------------


async def wait_idle(
    http: aiohttp.ClientSession, proxy: RunningProxy, sandbox: RunningSandbox
) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        status = await proxy_status(http, proxy)
        idle = (
            status["upstreams"]["DE"]["in_flight"] == 0
            and status["pool"]["acquired"] == 0
            and sandbox.state.restapi_in_flight == 0
        )
        if idle or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.05)


async def make_file(http: aiohttp.ClientSession, proxy: RunningProxy, size: int) -> tuple[str, bytes]:
    async with http.post(f"{proxy.url}/de/api/records", json={"record_key": "dl"}) as r:
        assert r.status == 201
    payload = bytes(range(256)) * (size // 256)
    form = aiohttp.FormData()
    form.add_field("file", payload, filename="big.bin", content_type="application/octet-stream")
    async with http.post(f"{proxy.url}/de/webapi/records/dl/files", data=form) as r:
        assert r.status == 201
        return f"{proxy.url}/de/webapi/records/dl/files/{(await r.json())['file_id']}", payload


async def test_client_disconnect_mid_download_releases_the_upstream(
    proxy: RunningProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    url, _ = await make_file(http, proxy, 4 * 1024 * 1024)
    sandbox.state.set_faults({"restapi": {"throttle_bytes_per_second": 1024 * 1024}})
    async with aiohttp.ClientSession() as client:
        resp = await client.get(url)
        await resp.content.readexactly(100_000)
        assert sandbox.state.restapi_in_flight == 1
        resp.close()  # the client goes away mid-body
    status = await wait_idle(http, proxy, sandbox)
    assert status["upstreams"]["DE"]["in_flight"] == 0
    assert status["pool"]["acquired"] == 0
    assert sandbox.state.restapi_in_flight == 0  # the upstream saw its connection close


async def test_client_disconnect_mid_upload_releases_the_upstream(
    proxy: RunningProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{proxy.url}/de/api/records", json={"record_key": "up"}) as r:
        assert r.status == 201
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    boundary = "b0undary"
    head = (
        f"POST /de/webapi/records/up/files HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\n'.encode()
    writer.write(head.encode() + f"{len(part):x}\r\n".encode() + part + b"\r\n")
    chunk = b"x" * 65536
    for _ in range(5):
        writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
    assert sandbox.state.restapi_in_flight == 1
    writer.close()  # gone mid-upload
    await writer.wait_closed()
    status = await wait_idle(http, proxy, sandbox)
    assert status["upstreams"]["DE"]["in_flight"] == 0
    assert status["pool"]["acquired"] == 0
    assert sandbox.state.restapi_in_flight == 0
    assert sandbox.state.writes == 1  # only the record; the cut upload stored nothing
    del reader


async def test_upstream_dying_mid_body_aborts_the_client(
    proxy: RunningProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    url, _ = await make_file(http, proxy, 1024 * 1024)
    sandbox.state.set_faults({"restapi": {"die_after_bytes": 200_000}})
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(url) as r:
            assert r.status == 200
            await r.read()
    status = await wait_idle(http, proxy, sandbox)
    assert status["pool"]["acquired"] == 0


async def test_sigterm_lets_a_5_second_download_finish(
    start_proxy_process: Callable[..., Awaitable[ProxyProcess]],
    sandbox: RunningSandbox,
    http: aiohttp.ClientSession,
) -> None:
    proc = await start_proxy_process(config_dict(sandbox), "--shutdown-grace", "20")
    async with http.post(f"{proc.url}/de/api/records", json={"record_key": "dl"}) as r:
        assert r.status == 201
    size = 5 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)
    form = aiohttp.FormData()
    form.add_field("file", payload, filename="big.bin", content_type="application/octet-stream")
    async with http.post(f"{proc.url}/de/webapi/records/dl/files", data=form) as r:
        file_id = (await r.json())["file_id"]
    sandbox.state.set_faults({"restapi": {"throttle_bytes_per_second": 1024 * 1024}})

    digest = hashlib.sha256()
    started = time.monotonic()
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{proc.url}/de/webapi/records/dl/files/{file_id}") as r:
            assert r.status == 200
            first = await r.content.readexactly(64 * 1024)
            digest.update(first)
            await asyncio.sleep(0.5)
            proc.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            # The listener is closed: new connections are refused while the download runs.
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as fresh:
                    await fresh.get(f"{proc.url}/_proxy/health")
            async for chunk in r.content.iter_any():
                digest.update(chunk)
    assert time.monotonic() - started >= 4
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()
    code = await asyncio.get_running_loop().run_in_executor(None, proc.process.wait, 30)
    assert code == 0
    events = [json.loads(line)["event"] for line in proc.log_lines() if line.strip()]
    assert "shutting_down" in events and events[-1] == "stopped"
