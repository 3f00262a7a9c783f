"""Streaming through a proxy process: 200 MB each way with its RSS staying flat."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import psutil
import pytest

from tests.conftest import ProxyProcess, RunningSandbox, RunningUpstream, config_dict
from tests.upstream import pattern_sha256

SIZE = 200 * 1024 * 1024
# Allowed RSS growth while 200 MB pass through: buffers and pools, never the body.
MAX_GROWTH = 40 * 1024 * 1024


class RssSampler:
    """Samples a process's RSS in the background; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self._proc = psutil.Process(pid)
        self.baseline: int = self._proc.memory_info().rss
        self.peak = self.baseline
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self._proc.memory_info().rss)
            await asyncio.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


@pytest.fixture
async def proxy_process(
    start_proxy_process: Callable[..., Awaitable[ProxyProcess]],
    sandbox: RunningSandbox,
    upstream: RunningUpstream,
    http: aiohttp.ClientSession,
) -> ProxyProcess:
    proc = await start_proxy_process(
        config_dict(sandbox, countries={"de": upstream.restapi_url("de")}, limits={"max_body_size": 2 * SIZE})
    )
    # Warm up: token fetched, pools and code paths loaded, before the baseline is taken.
    for _ in range(3):
        async with http.post(f"{proc.url}/de/echo", data=b"x" * 1_000_000) as r:
            assert r.status == 200
        async with http.get(f"{proc.url}/de/download?size=5000000") as r:
            await r.read()
    return proc


@pytest.mark.parametrize("length", ["0", "1"], ids=["chunked", "content-length"])
async def test_200mb_download_streams_with_flat_rss(
    proxy_process: ProxyProcess, http: aiohttp.ClientSession, length: str
) -> None:
    digest = hashlib.sha256()
    received = 0
    with RssSampler(proxy_process.process.pid) as rss:
        async with http.get(f"{proxy_process.url}/de/download?size={SIZE}&length={length}") as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                digest.update(chunk)
                received += len(chunk)
    assert received == SIZE
    assert digest.hexdigest() == pattern_sha256(SIZE)
    assert rss.growth < MAX_GROWTH, f"proxy RSS grew by {rss.growth / 2**20:.1f} MiB"


async def test_200mb_chunked_upload_streams_with_flat_rss(
    proxy_process: ProxyProcess, http: aiohttp.ClientSession
) -> None:
    chunk = bytes(range(256)) * 256  # 64 KiB
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(SIZE // len(chunk)):
            digest.update(chunk)
            yield chunk

    with RssSampler(proxy_process.process.pid) as rss:
        async with http.post(
            f"{proxy_process.url}/de/echo", data=body(), headers={"Content-Type": "application/octet-stream"}
        ) as r:
            assert r.status == 200
            seen = await r.json()
    assert seen["body_len"] == SIZE
    assert seen["body_sha256"] == digest.hexdigest()
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers.get("transfer-encoding") == "chunked"
    assert rss.growth < MAX_GROWTH, f"proxy RSS grew by {rss.growth / 2**20:.1f} MiB"


async def test_slow_client_gets_backpressure_not_buffering(
    proxy_process: ProxyProcess, http: aiohttp.ClientSession
) -> None:
    """A client that reads slowly must throttle the upstream, not fill the proxy's memory."""
    size = 100 * 1024 * 1024
    received = 0
    with RssSampler(proxy_process.process.pid) as rss:
        async with http.get(f"{proxy_process.url}/de/download?size={size}") as r:
            # Read the first 5 MB slowly while the upstream could send all 100 MB.
            while received < 5 * 1024 * 1024:
                chunk = await r.content.read(256 * 1024)
                received += len(chunk)
                await asyncio.sleep(0.02)
            async for chunk in r.content.iter_any():
                received += len(chunk)
    assert received == size
    assert rss.growth < MAX_GROWTH, f"proxy RSS grew by {rss.growth / 2**20:.1f} MiB"


async def test_proxy_process_logs_only_json(proxy_process: ProxyProcess) -> None:
    import json

    lines = [line for line in proxy_process.log_lines() if line.strip()]
    assert lines, "the proxy wrote no log lines"
    events = [json.loads(line) for line in lines]  # every line parses
    assert any(e["event"] == "listening" for e in events)
    assert any(e["event"] == "request" and e["country"] == "de" for e in events)
