"""Tokens: schedule arithmetic, response validation, and the provider against a real sandbox."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import Country, TokenSettings, parse_config
from proxy.errors import TokenUnavailableError
from proxy.tokens import (
    LocalTokenProvider,
    TokenFetcher,
    TokenFetchError,
    parse_token_response,
    token_schedule,
)
from tests.conftest import ManualClock, RunningProxy, RunningSandbox, config_dict, free_port

SETTINGS = TokenSettings()


@pytest.mark.parametrize(
    ("expires_in", "refresh_at", "usable_until"),
    [
        (300, 225.0, 270.0),  # margin capped at 30 s
        (3599, 2699.25, 3569.0),
        (4, 3.0, 3.6),  # margin is 10% of a short life
        (1, 0.75, 0.9),
    ],
)
def test_token_schedule(expires_in: int, refresh_at: float, usable_until: float) -> None:
    r, u, e = token_schedule(100.0, expires_in, SETTINGS)
    assert r == pytest.approx(100 + refresh_at)
    assert u == pytest.approx(100 + usable_until)
    assert e == 100 + expires_in
    assert r <= u < e


def test_refresh_never_after_usable_until() -> None:
    s = TokenSettings(refresh_ratio=0.95, expiry_margin=30)
    r, u, _ = token_schedule(0, 300, s)
    assert r == u == 270


GOOD = {"access_token": "tok-value-123", "expires_in": 300, "token_type": "bearer", "scope": "env"}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not JSON"),
        (b"<html>", "not JSON"),
        (b"[1]", "not a JSON object"),
        (json.dumps({**GOOD, "access_token": ""}).encode(), "no access_token"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "access_token"}).encode(), "no access_token"),
        (json.dumps({**GOOD, "token_type": "mac"}).encode(), "not bearer"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "token_type"}).encode(), "not bearer"),
        (json.dumps({**GOOD, "expires_in": 0}).encode(), "expires_in"),
        (json.dumps({**GOOD, "expires_in": "300"}).encode(), "expires_in"),
        (json.dumps({**GOOD, "expires_in": True}).encode(), "expires_in"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "expires_in"}).encode(), "expires_in"),
    ],
)
def test_malformed_token_responses_are_failures(body: bytes, reason: str) -> None:
    with pytest.raises(TokenFetchError) as err:
        parse_token_response(body, 0.0, "http://auth/t", SETTINGS)
    assert reason in str(err.value)
    assert "tok-value-123" not in str(err.value)


def test_good_token_response_and_repr_hides_value() -> None:
    token = parse_token_response(json.dumps({**GOOD, "token_type": "Bearer"}).encode(), 5.0, "u", SETTINGS)
    assert token.authorization == "Bearer tok-value-123"
    assert token.expires_at == 305.0
    assert "tok-value-123" not in repr(token) and "tok-value-123" not in str(token)


# --- the provider against a real sandbox ---------------------------------------------------

ProviderFactory = Callable[..., Awaitable[tuple[LocalTokenProvider, Country]]]


@pytest.fixture
async def make_provider(clock: ManualClock) -> AsyncIterator[ProviderFactory]:
    sessions: list[aiohttp.ClientSession] = []
    providers: list[LocalTokenProvider] = []

    async def make(
        sandbox: RunningSandbox, token_urls: list[str] | None = None
    ) -> tuple[LocalTokenProvider, Country]:
        config = parse_config(config_dict(sandbox, token_urls=token_urls), env={})
        session = aiohttp.ClientSession()
        sessions.append(session)
        provider = LocalTokenProvider(TokenFetcher(session, config.tokens, clock), config.tokens, clock)
        providers.append(provider)
        return provider, config.countries["de"]

    yield make
    for p in providers:
        await p.close()
    for s in sessions:
        await s.close()


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0.01)


async def test_cached_until_refresh_point_then_refreshed_in_background(
    sandbox: RunningSandbox, make_provider: ProviderFactory, clock: ManualClock
) -> None:
    provider, de = await make_provider(sandbox)
    first = await provider.get(de)
    assert sandbox.state.token_requests == 1
    clock.advance(200)
    assert (await provider.get(de)).value == first.value
    await settle()
    assert sandbox.state.token_requests == 1

    clock.advance(30)  # 230 s: past the refresh point (225), still usable (until 270)
    same = await provider.get(de)
    assert same.value == first.value  # the caller did not wait for the refresh
    await settle()
    assert sandbox.state.token_requests == 2
    fresh = await provider.get(de)
    assert fresh.value != first.value
    assert provider.status()[0].waits == 1


async def test_never_returns_an_expired_token(
    sandbox: RunningSandbox, make_provider: ProviderFactory, clock: ManualClock
) -> None:
    provider, de = await make_provider(sandbox)
    first = await provider.get(de)
    clock.advance(271)  # past usable_until (270) with no refresh in between
    second = await provider.get(de)
    assert second.value != first.value
    assert second.usable(clock())
    assert provider.status()[0].waits == 2


async def test_single_flight_for_concurrent_first_gets(
    sandbox: RunningSandbox, make_provider: ProviderFactory
) -> None:
    provider, de = await make_provider(sandbox)
    tokens = await asyncio.gather(*(provider.get(de) for _ in range(1000)))
    assert len({t.value.reveal() for t in tokens}) == 1
    assert sandbox.state.token_requests == 1


async def test_cancelled_waiter_does_not_cancel_the_shared_fetch(
    sandbox: RunningSandbox, make_provider: ProviderFactory
) -> None:
    provider, de = await make_provider(sandbox)
    first = asyncio.ensure_future(provider.get(de))
    second = asyncio.ensure_future(provider.get(de))
    await asyncio.sleep(0)
    first.cancel()
    token = await second
    assert first.cancelled()
    assert token.authorization.startswith("Bearer ")
    assert sandbox.state.token_requests == 1


async def test_invalidate_drops_only_the_rejected_token(
    sandbox: RunningSandbox, make_provider: ProviderFactory, clock: ManualClock
) -> None:
    provider, de = await make_provider(sandbox)
    old = await provider.get(de)
    assert provider.invalidate(de, old) is True
    new = await provider.get(de)
    assert new.value != old.value
    # A late 401 for the old token must not throw away the new one.
    assert provider.invalidate(de, old) is False
    assert (await provider.get(de)).value == new.value
    assert sandbox.state.token_requests == 2


async def test_failover_to_second_url(sandbox: RunningSandbox, make_provider: ProviderFactory) -> None:
    dead = f"http://127.0.0.1:{free_port()}/oauth2/token/"
    provider, de = await make_provider(sandbox, token_urls=[dead, sandbox.token_url("emea")])
    token = await provider.get(de)
    assert token.source_url == sandbox.token_url("emea")


async def test_outage_backs_off_then_recovers(
    sandbox: RunningSandbox,
    make_provider: ProviderFactory,
    clock: ManualClock,
    start_sandbox: Callable[..., Awaitable[RunningSandbox]],
) -> None:
    provider, de = await make_provider(sandbox)
    port = sandbox.server.port
    await sandbox.server.close()  # the auth server goes away
    with pytest.raises(TokenUnavailableError) as err:
        await provider.get(de)
    assert err.value.retry_after is not None and err.value.retry_after >= 1
    assert provider.status()[0].fetches == 1
    # Within the backoff, callers are answered at once without hitting the dead server.
    with pytest.raises(TokenUnavailableError):
        await provider.get(de)
    assert provider.status()[0].fetches == 1
    assert provider.status()[0].state == "failing"

    revived = await start_sandbox(port=port)  # back on the same port
    clock.advance(1.1)
    token = await provider.get(de)
    assert token.usable(clock())
    assert provider.status()[0].last_error is None
    assert revived.state.token_requests == 1


async def test_valid_token_kept_while_refresh_fails_but_expired_one_never_used(
    sandbox: RunningSandbox, make_provider: ProviderFactory, clock: ManualClock
) -> None:
    provider, de = await make_provider(sandbox)
    first = await provider.get(de)
    await sandbox.server.close()
    clock.advance(230)  # refresh due, refresh fails
    assert (await provider.get(de)).value == first.value
    await settle()
    assert provider.status()[0].failures == 1
    assert (await provider.get(de)).value == first.value
    clock.advance(41)  # past usable_until
    with pytest.raises(TokenUnavailableError):
        await provider.get(de)


# --- through the proxy ---------------------------------------------------------------------


class TokenGate:
    """A token URL that holds every request until released, then relays it to the sandbox."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.release = asyncio.Event()
        self.calls = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = await request.read()
        await self.release.wait()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("authorization", "content-type", "user-agent")
        }
        async with aiohttp.ClientSession() as s, s.post(self.target, data=body, headers=headers) as r:
            return web.Response(status=r.status, body=await r.read(), content_type="application/json")


async def test_1000_concurrent_first_requests_cause_one_token_fetch(
    aiohttp_server: Any,
    sandbox: RunningSandbox,
    start_proxy: Callable[..., Awaitable[RunningProxy]],
    http: aiohttp.ClientSession,
) -> None:
    gate = TokenGate(sandbox.token_url("idp"))
    app = web.Application()
    app.router.add_post("/oauth2/token/", gate.handle)
    gate_server = await aiohttp_server(app)
    proxy = await start_proxy(config_dict(sandbox, token_urls=[str(gate_server.make_url("/oauth2/token/"))]))

    async def one() -> int:
        async with http.post(f"{proxy.url}/de/api/records/find", json={}) as r:
            await r.read()
            return r.status

    tasks = [asyncio.ensure_future(one()) for _ in range(1000)]
    # Wait until all 1,000 requests are inside the proxy, waiting for the token.
    assert proxy.server.runner is not None and proxy.server.runner.server is not None
    handler = proxy.server.runner.server
    deadline = time.monotonic() + 60
    while len(handler.connections) < 1000 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(handler.connections) == 1000
    assert gate.calls == 1
    gate.release.set()
    statuses = await asyncio.gather(*tasks)
    assert statuses == [200] * 1000
    assert sandbox.state.token_requests == 1
    assert sandbox.state.api_requests == 1000


async def test_refresh_ahead_with_short_expiry_keeps_requests_flowing(
    start_sandbox: Callable[..., Awaitable[RunningSandbox]],
    start_proxy: Callable[..., Awaitable[RunningProxy]],
    http: aiohttp.ClientSession,
) -> None:
    sandbox = await start_sandbox(expires_in=4)
    proxy = await start_proxy(config_dict(sandbox))
    statuses = []
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        async with http.post(f"{proxy.url}/de/api/records/find", json={}) as r:
            statuses.append(r.status)
        await asyncio.sleep(0.02)
    assert set(statuses) == {200}
    assert sandbox.state.unauthorized == 0  # no expired token ever reached the API
    assert sandbox.state.token_requests >= 3  # refreshed every ~3 s, before expiry at 4 s
    async with http.get(f"{proxy.url}/_proxy/tokens") as r:
        status = (await r.json())["tokens"][0]
    # Only the very first request waited for a token; refreshes happened in the background.
    assert status["waits"] == 1


async def test_token_that_arrives_already_expired_is_never_used(
    sandbox: RunningSandbox, make_provider: ProviderFactory, clock: ManualClock
) -> None:
    provider, de = await make_provider(sandbox)
    sandbox.state.set_faults({"token": {"delay": 0.2}})
    pending = asyncio.ensure_future(provider.get(de))
    await asyncio.sleep(0.05)
    clock.advance(400)  # the whole 300 s life passes while the request is in flight
    with pytest.raises(TokenUnavailableError, match="usable life"):
        await pending


async def test_same_token_cannot_extend_its_life(
    sandbox: RunningSandbox, make_provider: ProviderFactory, clock: ManualClock
) -> None:
    provider, de = await make_provider(sandbox)
    first = await provider.get(de)
    sandbox.state.set_faults({"token": {"mode": "same_token"}})
    clock.advance(230)  # refresh due; the auth server hands back the same token
    assert (await provider.get(de)).value == first.value
    await settle()
    kept = await provider.get(de)
    assert kept.value == first.value
    assert kept.expires_at == first.expires_at  # the first expiry stands
    assert kept.refresh_at == first.expires_at  # no more refreshes before it
    fetches = provider.status()[0].fetches
    clock.advance(20)
    await provider.get(de)
    await settle()
    assert provider.status()[0].fetches == fetches  # no spinning


async def test_rejected_token_is_never_taken_back(
    sandbox: RunningSandbox, make_provider: ProviderFactory, clock: ManualClock
) -> None:
    provider, de = await make_provider(sandbox)
    token = await provider.get(de)
    sandbox.state.set_faults({"token": {"mode": "same_token"}})
    assert provider.invalidate(de, token)
    with pytest.raises(TokenUnavailableError, match="just rejected"):
        await provider.get(de)
