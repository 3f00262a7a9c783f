"""Shared fixtures: real servers on loopback (sandbox, proxy, test upstream), a manual
clock, a proxy subprocess, and the suite-wide check that no secret reaches any output.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import build_app
from proxy.config import Config, parse_config
from proxy.logs import configure_logging
from proxy.sandbox import DEFAULT_CLIENT, SANDBOX_STATE, SandboxSettings, SandboxState, build_sandbox_app
from tests.upstream import UPSTREAM, UpstreamState, build_upstream_app

ROOT = Path(__file__).resolve().parent.parent

configure_logging("json", "debug")


# --- secrets in output -----------------------------------------------------------------


class SecretRegistry:
    """Every secret the suite creates: client secrets and every token a sandbox issued."""

    def __init__(self) -> None:
        self.static: set[str] = {DEFAULT_CLIENT.client_secret}
        self.states: list[SandboxState] = []

    def all(self) -> set[str]:
        found = set(self.static)
        for state in self.states:
            found.update(state.issued_tokens)
        return found

    def leaks(self, text: str) -> int:
        """How many known secrets occur in ``text`` (never which: that would print them)."""
        return sum(1 for s in self.all() if s and s in text)


SECRETS = SecretRegistry()

# Every sandbox the suite creates, whichever fixture builds it, registers its state so
# that the tokens it issues are scanned for.
_sandbox_state_init = SandboxState.__init__


def _registering_init(self: SandboxState) -> None:
    _sandbox_state_init(self)
    SECRETS.states.append(self)


SandboxState.__init__ = _registering_init  # type: ignore[method-assign]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Fail any test phase whose captured output or error report contains a secret."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    # Sections accumulate over phases; scan only this phase's, so a leak is reported once.
    text = "\n".join(content for name, content in report.sections if name.endswith(call.when))
    if report.longrepr is not None:
        text += "\n" + str(report.longrepr)
    leaked = SECRETS.leaks(text)
    if leaked:
        report.outcome = "failed"
        report.longrepr = (
            f"SECRET LEAK: {leaked} token(s) or client secret(s) appeared in the output of "
            f"{item.nodeid} ({call.when}); output withheld so the secret is not printed again"
        )
        report.sections = []


# --- problem documents -------------------------------------------------------------------

PROBLEM = "application/problem+json"


async def problem(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    """Assert ``resp`` is a complete problem document (RFC 9457) with ``status``; return it."""
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Type"].startswith(PROBLEM)
    doc: dict[str, Any] = json.loads(await resp.read())
    assert doc["status"] == status
    assert doc["detail"] and doc["title"] and doc["hop"]
    return doc


# --- clocks ----------------------------------------------------------------------------


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 10_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


# --- servers ---------------------------------------------------------------------------


@dataclass
class RunningSandbox:
    url: str
    state: SandboxState
    server: TestServer

    def restapi_url(self, cc: str) -> str:
        return f"{self.url}/{cc}"

    def token_url(self, name: str = "idp") -> str:
        return f"{self.url}/{name}/oauth2/token/"


@dataclass
class RunningUpstream:
    url: str
    state: UpstreamState
    server: TestServer

    def restapi_url(self, cc: str) -> str:
        return f"{self.url}/up/{cc}"


@dataclass
class RunningProxy:
    url: str
    app: web.Application
    server: TestServer
    config: Config


ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
def start_sandbox(aiohttp_server: ServerFactory) -> Callable[..., Awaitable[RunningSandbox]]:
    async def start(
        clock: Callable[[], float] = time.time, port: int | None = None, **settings: Any
    ) -> RunningSandbox:
        app = build_sandbox_app(SandboxSettings(**settings), clock)
        server = await aiohttp_server(app, port=port)
        state = app[SANDBOX_STATE]
        return RunningSandbox(url=str(server.make_url("")).rstrip("/"), state=state, server=server)

    return start


@pytest.fixture
async def sandbox(start_sandbox: Callable[..., Awaitable[RunningSandbox]]) -> RunningSandbox:
    return await start_sandbox()


@pytest.fixture
async def upstream(aiohttp_server: ServerFactory, sandbox: RunningSandbox) -> RunningUpstream:
    issued = sandbox.state.issued_tokens
    app = build_upstream_app(lambda token: token in issued)
    server = await aiohttp_server(app)
    return RunningUpstream(url=str(server.make_url("")).rstrip("/"), state=app[UPSTREAM], server=server)


def config_dict(
    sandbox: RunningSandbox,
    countries: dict[str, str] | None = None,
    token_urls: list[str] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A proxy config for tests: countries map code -> restapi_url (default: sandbox DE, AU)."""
    if countries is None:
        countries = {"de": sandbox.restapi_url("de"), "au": sandbox.restapi_url("au")}
    doc: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "credentials": {
            "default": {
                "client_id": DEFAULT_CLIENT.client_id,
                "client_secret": DEFAULT_CLIENT.client_secret,
                "environment_id": DEFAULT_CLIENT.environment_id,
            }
        },
        "regions": {
            "emea": {"token_urls": token_urls or [sandbox.token_url("idp"), sandbox.token_url("emea")]}
        },
        "countries": {cc: {"region": "emea", "restapi_url": url} for cc, url in countries.items()},
        "routing": {"country_header": "X-InCountry-Country", "path_prefix": True},
    }
    doc.update(sections)
    return doc


@pytest.fixture
def start_proxy(aiohttp_server: ServerFactory) -> Callable[..., Awaitable[RunningProxy]]:
    async def start(doc: dict[str, Any], clock: Callable[[], float] = time.monotonic) -> RunningProxy:
        config = parse_config(doc, env={})
        app = build_app(config, clock=clock)
        server = await aiohttp_server(app)
        return RunningProxy(url=str(server.make_url("")).rstrip("/"), app=app, server=server, config=config)

    return start


@pytest.fixture
async def proxy(start_proxy: Callable[..., Awaitable[RunningProxy]], sandbox: RunningSandbox) -> RunningProxy:
    return await start_proxy(config_dict(sandbox))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client: no decompression, no cookie jar, so tests see bytes as sent."""
    async with aiohttp.ClientSession(
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=0),
    ) as session:
        yield session


# --- the proxy as a separate process -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ProxyProcess:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()


@pytest.fixture
def start_proxy_process(tmp_path: Path) -> Iterator[Callable[..., Awaitable[ProxyProcess]]]:
    """Run ``python -m proxy serve`` in a subprocess (for RSS, signals, real startup)."""
    started: list[ProxyProcess] = []

    async def start(doc: dict[str, Any], *extra_args: str) -> ProxyProcess:
        port = free_port()
        doc = {**doc, "listen": {"host": "127.0.0.1", "port": port}}
        cfg = tmp_path / f"proxy-{port}.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        log_path = tmp_path / f"proxy-{port}.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--config", str(cfg), *extra_args],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        running = ProxyProcess(url=f"http://127.0.0.1:{port}", process=proc, log_path=log_path)
        started.append(running)
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as s:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"proxy exited early with {proc.returncode}")
                try:
                    async with s.get(running.url + "/_proxy/health") as r:
                        if r.status == 200:
                            return running
                except aiohttp.ClientConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("proxy did not start in 20 s")
                await asyncio.sleep(0.05)

    yield start
    for p in started:
        if p.process.poll() is None:
            p.process.terminate()
            try:
                p.process.wait(10)
            except subprocess.TimeoutExpired:
                p.process.kill()
        output = p.log_path.read_text(errors="replace")
        assert SECRETS.leaks(output) == 0, f"a secret appeared in the proxy's output ({p.log_path})"
