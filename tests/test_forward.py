"""End to end over real sockets: client → proxy → sandbox or test upstream."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from yarl import URL

from tests.conftest import (
    RunningProxy,
    RunningSandbox,
    RunningUpstream,
    config_dict,
    free_port,
    problem,
)
from tests.upstream import GZIP_BODY, GZIP_PLAIN, pattern_sha256

StartProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def up_proxy(
    start_proxy: StartProxy, sandbox: RunningSandbox, upstream: RunningUpstream
) -> RunningProxy:
    """A proxy whose DE and AU point at the test upstream (base path /up/{cc})."""
    return await start_proxy(
        config_dict(sandbox, countries={"de": upstream.restapi_url("de"), "au": upstream.restapi_url("au")})
    )


# --- through the sandbox: the product's real job ---------------------------------------


async def test_prefix_and_header_routes_reach_the_sandbox_with_a_token(
    proxy: RunningProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    record = {"record_key": "k1", "key1": "alice", "body": "hello"}
    async with http.post(f"{proxy.url}/de/api/records", json=record) as r:
        assert r.status == 201, await r.text()
        created = await r.json()
    assert created["record_key"] == "k1" and created["version"] == 1

    find = {"filter": {"key1": "alice"}, "options": {"limit": 10}}
    async with http.post(
        f"{proxy.url}/api/records/find", json=find, headers={"X-InCountry-Country": "DE"}
    ) as r:
        assert r.status == 200
        found = await r.json()
    assert [d["record_key"] for d in found["data"]] == ["k1"]
    assert found["meta"]["total"] == 1

    # The record is in DE only: AU's emulator has nothing.
    async with http.post(f"{proxy.url}/au/api/records/find", json=find) as r:
        assert r.status == 200
        assert (await r.json())["meta"]["total"] == 0
    assert sandbox.state.unauthorized == 0
    # One token per country, not per request or per region.
    assert sandbox.state.token_requests == 2


async def test_file_upload_and_download_round_trip(proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{proxy.url}/de/api/records", json={"record_key": "f1"}) as r:
        assert r.status == 201
    payload = bytes(range(256)) * 4096
    form = aiohttp.FormData()
    form.add_field("file", payload, filename="scan.bin", content_type="application/octet-stream")
    async with http.post(f"{proxy.url}/de/webapi/records/f1/files", data=form) as r:
        assert r.status == 201, await r.text()
        meta = await r.json()
    assert meta["sha256"] == hashlib.sha256(payload).hexdigest()
    async with http.get(f"{proxy.url}/de/webapi/records/f1/files/{meta['file_id']}") as r:
        assert r.status == 200
        assert await r.read() == payload


async def test_conflicting_header_and_prefix_is_refused_before_any_token(
    proxy: RunningProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{proxy.url}/de/api/records", json={"record_key": "x"}, headers={"X-InCountry-Country": "au"}
    ) as r:
        doc = await problem(r, 400)
    assert "DE" in doc["detail"] and "AU" in doc["detail"]
    assert doc["hop"] == "routing"
    assert sandbox.state.token_requests == 0
    assert sandbox.state.api_requests == 0


@pytest.mark.parametrize(
    ("path", "headers", "needle"),
    [
        ("/api/records/find", {}, "names no country"),
        ("/xx/api/records/find", {}, "XX"),
        ("/api/records/find", {"X-InCountry-Country": "fr"}, "FR"),
        ("/de/../au/api/records/find", {}, "'..'"),
    ],
)
async def test_unroutable_requests_get_400_problem(
    proxy: RunningProxy,
    sandbox: RunningSandbox,
    http: aiohttp.ClientSession,
    path: str,
    headers: dict[str, str],
    needle: str,
) -> None:
    url = URL(f"{proxy.url}{path}", encoded=True)  # keep dot segments as sent
    async with http.post(url, json={}, headers=headers) as r:
        doc = await problem(r, 400)
    assert needle in doc["detail"]
    assert sandbox.state.token_requests == 0


async def test_token_unavailable_gives_503_with_retry_after_and_nothing_forwarded(
    start_proxy: StartProxy, sandbox: RunningSandbox, upstream: RunningUpstream, http: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/oauth2/token/"
    proxy = await start_proxy(
        config_dict(sandbox, countries={"de": upstream.restapi_url("de")}, token_urls=[dead])
    )
    async with http.get(f"{proxy.url}/de/echo") as r:
        doc = await problem(r, 503)
        assert int(r.headers["Retry-After"]) >= 1
    assert doc["hop"] == "token_server"
    assert upstream.state.requests == []


async def test_wrong_credentials_give_503_naming_the_auth_error(
    start_proxy: StartProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    doc = config_dict(sandbox)
    doc["credentials"]["default"]["client_secret"] = "not-the-secret"
    proxy = await start_proxy(doc)
    async with http.get(f"{proxy.url}/de/api/records/find") as r:
        body = await problem(r, 503)
    assert "invalid_client" in body["detail"]
    assert "not-the-secret" not in body["detail"]
    # A refusal of the credentials is not retried on the second token URL.
    assert sandbox.state.token_requests == 1


async def test_second_token_url_is_used_when_the_first_refuses_connections(
    start_proxy: StartProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/oauth2/token/"
    proxy = await start_proxy(config_dict(sandbox, token_urls=[dead, sandbox.token_url("emea")]))
    async with http.post(f"{proxy.url}/de/api/records/find", json={}) as r:
        assert r.status == 200
    assert sandbox.state.token_requests_by_path == {"/emea/oauth2/token/": 1}


# --- forwarding rules, against the test upstream ----------------------------------------


async def test_request_headers_are_rewritten(
    up_proxy: RunningProxy, upstream: RunningUpstream, http: aiohttp.ClientSession
) -> None:
    headers = {
        "Authorization": "Bearer client-supplied",
        "X-InCountry-Country": "de",
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "1",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic abc",
        "TE": "trailers",
        "Upgrade": "websocket",
        "X-Forwarded-For": "6.6.6.6",
        "X-Custom": "kept",
        "User-Agent": "legacy-app/1.0",
    }
    async with http.get(
        f"{up_proxy.url}/de/echo", headers=headers, skip_auto_headers=["Accept", "Accept-Encoding"]
    ) as r:
        assert r.status == 200
        seen = await r.json()
        request_id = r.headers["X-Request-Id"]
    got = {k.lower(): v for k, v in seen["headers"]}
    assert seen["authorization"] == "valid"  # the client's own was replaced by a sandbox token
    for name in ("x-incountry-country", "x-drop-me", "keep-alive", "proxy-authorization", "te", "upgrade"):
        assert name not in got, name
    assert got["host"] == up_proxy.config.countries["de"].upstream_host
    assert got["x-forwarded-for"] == "127.0.0.1"  # the forged value was replaced
    assert got["x-forwarded-proto"] == "http"
    assert got["x-forwarded-host"] == up_proxy.url.removeprefix("http://")
    assert got["via"] == "1.1 incountry-proxy"
    assert got["x-custom"] == "kept"
    assert len(got["x-request-id"]) == 32  # generated, and the same one the client gets back
    assert got["x-request-id"] == request_id
    assert got["user-agent"] == "legacy-app/1.0"
    # aiohttp's client must not add headers the caller did not send.
    assert "accept-encoding" not in got and "accept" not in got


async def test_no_auto_user_agent_or_content_type(
    up_proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{up_proxy.url}/de/echo",
        data=b"raw",
        skip_auto_headers=["User-Agent", "Content-Type", "Accept", "Accept-Encoding"],
    ) as r:
        got = {k.lower() for k, _ in (await r.json())["headers"]}
    assert "user-agent" not in got and "content-type" not in got


async def test_raw_path_and_query_pass_unchanged_and_prefix_is_stripped(
    up_proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    raw = "/de/echo/a%2Fb/%C3%A9?q=a%20b&q=c+d&empty=&x=%2F"
    async with http.get(URL(f"{up_proxy.url}{raw}", encoded=True), skip_auto_headers=["User-Agent"]) as r:
        seen = await r.json()
    # yarl must not re-encode; the prefix /de is replaced by the base path /up/de.
    assert seen["raw_path"] == "/up/de/echo/a%2Fb/%C3%A9?q=a%20b&q=c+d&empty=&x=%2F"


async def test_methods_and_body_pass_unchanged(up_proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    body = b"\x00\x01binary" * 1000
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        async with http.request(method, f"{up_proxy.url}/de/echo", data=body) as r:
            seen = await r.json()
        assert seen["method"] == method
        assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    # A GET without a body stays without one (no chunked empty body).
    async with http.get(f"{up_proxy.url}/de/echo") as r:
        seen = await r.json()
    got = {k.lower() for k, _ in seen["headers"]}
    assert seen["body_len"] == 0 and "transfer-encoding" not in got and "content-length" not in got


async def test_chunked_upload_is_streamed(up_proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    digest = hashlib.sha256()

    async def gen() -> AsyncIterator[bytes]:
        for i in range(64):
            chunk = bytes([i]) * 65536
            digest.update(chunk)
            yield chunk

    async with http.post(f"{up_proxy.url}/de/echo", data=gen()) as r:
        seen = await r.json()
    assert seen["body_len"] == 64 * 65536
    assert seen["body_sha256"] == digest.hexdigest()


async def test_gzip_response_passes_byte_for_byte(
    up_proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{up_proxy.url}/de/gzip", headers={"Accept-Encoding": "gzip"}) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert r.headers["Content-Length"] == str(len(GZIP_BODY))
        assert r.headers["ETag"] == '"g1"'
        body = await r.read()
    assert body == GZIP_BODY
    assert gzip.decompress(body) == GZIP_PLAIN


async def test_gzip_upload_is_not_inflated(up_proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    compressed = gzip.compress(b"x" * 100_000, mtime=0)
    async with http.post(
        f"{up_proxy.url}/de/echo",
        data=compressed,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    ) as r:
        seen = await r.json()
    assert seen["body_len"] == len(compressed)
    assert seen["body_sha256"] == hashlib.sha256(compressed).hexdigest()
    got = {k.lower(): v for k, v in seen["headers"]}
    assert got["content-encoding"] == "gzip"
    assert got["content-length"] == str(len(compressed))


async def test_response_hop_by_hop_removed_and_cookies_kept_not_stored(
    up_proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{up_proxy.url}/de/hop") as r:
        assert r.headers["X-Kept"] == "kept"
        for name in ("X-Private", "Keep-Alive", "Proxy-Authenticate"):
            assert name not in r.headers
    async with http.get(f"{up_proxy.url}/de/cookies") as r:
        assert r.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    # A second client must not receive the first one's cookies from the proxy's jar.
    async with http.get(f"{up_proxy.url}/de/cookies") as r:
        assert (await r.json())["cookie"] is None


async def test_upstream_status_codes_and_head_pass_through(
    up_proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    for code in (204, 304, 404, 409, 500):
        async with http.get(f"{up_proxy.url}/de/status?code={code}") as r:
            assert r.status == code
            assert r.headers["X-Status"] == str(code)
    async with http.head(f"{up_proxy.url}/de/gzip") as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(len(GZIP_BODY))
        assert await r.read() == b""


async def test_connect_failure_is_502_problem(
    start_proxy: StartProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(config_dict(sandbox, countries={"de": f"http://127.0.0.1:{free_port()}/de"}))
    async with http.get(f"{proxy.url}/de/api/records/find") as r:
        doc = await problem(r, 502)
    assert doc["hop"] == "upstream_connect"


async def test_upstream_timeout_is_504_problem(
    start_proxy: StartProxy, sandbox: RunningSandbox, upstream: RunningUpstream, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        config_dict(sandbox, countries={"de": upstream.restapi_url("de")}, upstream={"read_timeout": 0.3})
    )
    async with http.get(f"{proxy.url}/de/slow?delay=2") as r:
        doc = await problem(r, 504)
    assert doc["hop"] == "upstream_timeout"


async def test_trace_is_refused(
    up_proxy: RunningProxy, upstream: RunningUpstream, http: aiohttp.ClientSession
) -> None:
    async with http.request("TRACE", f"{up_proxy.url}/de/echo") as r:
        await problem(r, 405)
    assert upstream.state.requests == []


async def test_body_over_limit_gets_413(
    start_proxy: StartProxy, sandbox: RunningSandbox, upstream: RunningUpstream, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        config_dict(sandbox, countries={"de": upstream.restapi_url("de")}, limits={"max_body_size": 1000})
    )
    async with http.post(f"{proxy.url}/de/echo", data=b"x" * 1001) as r:
        await problem(r, 413)

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 500

    async with http.post(f"{proxy.url}/de/echo", data=gen()) as r:
        await problem(r, 413)


async def test_upstream_dying_mid_body_aborts_the_client(
    up_proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    for length in ("0", "1"):  # chunked, then Content-Length framing
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.get(f"{up_proxy.url}/de/die?length={length}") as r:
                assert r.status == 200
                await r.read()


async def test_large_download_streams_intact(up_proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    size = 20 * 1024 * 1024 + 123
    h = hashlib.sha256()
    async with http.get(f"{up_proxy.url}/de/download?size={size}") as r:
        async for chunk in r.content.iter_any():
            h.update(chunk)
    assert h.hexdigest() == pattern_sha256(size)


async def test_token_status_endpoint_shows_health_without_tokens(
    proxy: RunningProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{proxy.url}/de/api/records/find") as r:
        assert r.status in (200, 405)
    async with http.get(f"{proxy.url}/_proxy/tokens") as r:
        text = await r.text()
        doc = json.loads(text)
    assert doc["tokens"][0]["countries"] == ["DE"]
    assert doc["tokens"][0]["state"] == "valid"
    assert 0 < doc["tokens"][0]["expires_in"] <= 300
    assert all(t not in text for t in sandbox.state.issued_tokens)


async def test_concurrent_requests_share_the_pool(
    up_proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    results = await asyncio.gather(*(http.get(f"{up_proxy.url}/de/auth") for _ in range(50)))
    for r in results:
        assert r.status == 200
        assert (await r.json())["authorization"] == "valid"
        r.release()


async def test_sandbox_token_digests_name_tokens_without_revealing_them(
    proxy: RunningProxy, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{proxy.url}/de/api/records/find", json={}) as r:
        assert r.status == 200
    async with http.get(f"{sandbox.url}/_sandbox/tokens/digests") as r:
        text = await r.text()
    (token,) = sandbox.state.issued_tokens
    assert json.loads(text)["sha256"] == [hashlib.sha256(token.encode()).hexdigest()]
    assert token not in text
