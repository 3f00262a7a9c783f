"""Soak test: mixed traffic through a proxy process for a while, with faults switching.

Starts the sandbox and the proxy as separate processes on loopback, drives mixed
traffic (record writes, finds, deletes, file uploads and downloads, header and prefix
routing, refused routes) from several workers, and switches the sandbox's faults on
and off in a cycle. At the end it reports requests, errors by kind, and the proxy's
RSS and open file descriptors at start and end, and checks the invariants:

- every acknowledged write is readable afterwards (nothing lost);
- no request reached the REST API without a valid token beyond the 401s the faults
  injected;
- no token or client secret appears in the proxy's or the sandbox's output.

Usage: ``python scripts/soak.py --duration 600 [--workers 16] [--report FILE]``
(``make soak``). It only talks to 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLIENT_SECRET = "soak-secret-value"
# The sandbox's tokens are secrets.token_urlsafe(32): 43 URL-safe characters.
TOKEN_SHAPED = re.compile(r"[A-Za-z0-9_-]{43}")

# (seconds, fault spec): the cycle of faults, repeated for the whole run.
FAULT_CYCLE: list[tuple[float, dict[str, Any]]] = [
    (20, {}),
    # Longer than a token's life (--expires-in 30): requests must get 503, never an expired token.
    (40, {"token": {"mode": "down"}}),
    (15, {}),
    (10, {"token": {"mode": "down", "paths": ["/idp/oauth2/token/"]}}),
    (10, {"token": {"mode": "empty", "paths": ["/idp/oauth2/token/"]}}),
    (10, {"restapi": {"unauthorized": 20}}),
    (10, {"restapi": {"delay": 0.3}}),
    (8, {"restapi": {"status": 503, "status_count": 30}}),
    (10, {"restapi": {"die_after_bytes": 50_000}}),
    (10, {"restapi": {"throttle_bytes_per_second": 2_000_000}}),
    (15, {"token": {"mode": "same_token"}}),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proxy_config(sandbox_port: int, proxy_port: int) -> dict[str, Any]:
    base = f"http://127.0.0.1:{sandbox_port}"
    return {
        "listen": {"host": "127.0.0.1", "port": proxy_port},
        "credentials": {
            "default": {
                "client_id": "soak-client",
                "client_secret": CLIENT_SECRET,
                "environment_id": "soak-env",
            }
        },
        "regions": {"emea": {"token_urls": [f"{base}/idp/oauth2/token/", f"{base}/emea/oauth2/token/"]}},
        "countries": {cc: {"region": "emea", "restapi_url": f"{base}/{cc}"} for cc in ("de", "us", "in")},
        "upstream": {"first_byte_timeout": 5, "read_timeout": 5, "keepalive_timeout": 2},
        "quota": {"queue_timeout": 5},
    }


class Soak:
    def __init__(self, proxy: str, sandbox: str, duration: float, workers: int, fault_scale: float) -> None:
        self.fault_scale = fault_scale
        self.proxy = proxy
        self.sandbox = sandbox
        self.duration = duration
        self.workers = workers
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.acked: dict[str, set[str]] = collections.defaultdict(set)
        self.deleted: dict[str, set[str]] = collections.defaultdict(set)
        self.injected_401 = 0
        self.stop_at = 0.0

    def count(self, op: str, status: int, body: bytes = b"") -> None:
        kind = f"{op} {status}"
        if status >= 400 and body[:1] == b"{":
            try:
                hop = json.loads(body).get("hop")
            except ValueError:
                hop = None
            if hop:
                kind += f" ({hop})"
        self.outcomes[kind] += 1

    async def faults(self, http: aiohttp.ClientSession) -> None:
        i = 0
        while time.monotonic() < self.stop_at:
            seconds, spec = FAULT_CYCLE[i % len(FAULT_CYCLE)]
            async with http.put(f"{self.sandbox}/_sandbox/faults", json=spec) as r:
                assert r.status == 200, await r.text()
            self.injected_401 += spec.get("restapi", {}).get("unauthorized", 0)
            await asyncio.sleep(min(seconds * self.fault_scale, max(0.0, self.stop_at - time.monotonic())))
            i += 1
        async with http.delete(f"{self.sandbox}/_sandbox/faults") as r:
            assert r.status == 200

    async def worker(self, n: int, http: aiohttp.ClientSession) -> None:
        rng = random.Random(n)
        seq = 0
        while time.monotonic() < self.stop_at:
            cc = rng.choice(["de", "us", "in"])
            op = rng.choices(
                ["create", "find", "delete", "upload", "bad_route", "header"], [30, 35, 10, 10, 5, 10]
            )[0]
            seq += 1
            key = f"w{n}-{seq}"
            try:
                await self.one(http, rng, op, cc, key)
            except (aiohttp.ClientError, TimeoutError) as e:
                self.outcomes[f"{op} transport:{type(e).__name__}"] += 1

    async def one(self, http: aiohttp.ClientSession, rng: random.Random, op: str, cc: str, key: str) -> None:
        p = self.proxy
        if op == "create":
            async with http.post(f"{p}/{cc}/api/records", json={"record_key": key, "key1": "soak"}) as r:
                body = await r.read()
                self.count(op, r.status, body)
                if r.status == 201:
                    self.acked[cc].add(key)
        elif op in ("find", "header"):
            url = f"{p}/{cc}/api/records/find" if op == "find" else f"{p}/api/records/find"
            headers = {} if op == "find" else {"X-InCountry-Country": cc.upper()}
            async with http.post(
                url, json={"filter": {"key1": "soak"}, "options": {"limit": 5}}, headers=headers
            ) as r:
                self.count(op, r.status, await r.read())
        elif op == "delete":
            # Only this worker's own records, never one it is using right now.
            mine = sorted(
                k for k in self.acked[cc] - self.deleted[cc] if k.startswith(key.split("-")[0] + "-")
            )
            if not mine:
                return
            victim = rng.choice(mine)
            async with http.delete(f"{p}/{cc}/api/records/{cc}/{victim}") as r:
                self.count(op, r.status, await r.read())
                if r.status == 204:
                    self.deleted[cc].add(victim)
        elif op == "upload":
            async with http.post(f"{p}/{cc}/api/records", json={"record_key": key}) as r:
                self.count("create", r.status, await r.read())
                if r.status != 201:
                    return
                self.acked[cc].add(key)
            data = os.urandom(rng.choice([10_000, 300_000, 2_000_000]))
            form = aiohttp.FormData()
            form.add_field("file", data, filename="f.bin", content_type="application/octet-stream")
            async with http.post(f"{p}/{cc}/webapi/records/{key}/files", data=form) as r:
                body = await r.read()
                self.count(op, r.status, body)
                if r.status != 201:
                    return
                file_id = json.loads(body)["file_id"]
            try:
                async with http.get(f"{p}/{cc}/webapi/records/{key}/files/{file_id}") as r:
                    got = await r.read()
                    self.count("download", r.status)
                    if r.status == 200 and got != data:
                        self.outcomes["download CORRUPT"] += 1
            except aiohttp.ClientPayloadError:
                self.outcomes["download aborted (truncated upstream, client told)"] += 1
        elif op == "bad_route":
            async with http.post(
                f"{p}/de/api/records/find", json={}, headers={"X-InCountry-Country": "us"}
            ) as r:
                self.count(op, r.status, await r.read())

    async def verify(self, http: aiohttp.ClientSession) -> dict[str, int]:
        """Every acknowledged, undeleted write must be in its country, and in no other."""
        found: dict[str, set[str]] = {}
        for cc in ("de", "us", "in"):
            found[cc] = set()
            offset = 0
            while True:
                body = {"filter": {}, "options": {"limit": 100, "offset": offset}}
                async with http.post(f"{self.proxy}/{cc}/api/records/find", json=body) as r:
                    assert r.status == 200, await r.text()
                    doc = await r.json()
                found[cc].update(d["record_key"] for d in doc["data"])
                offset += 100
                if offset >= doc["meta"]["total"]:
                    break
        checked = missing = misrouted = 0
        for cc, keys in self.acked.items():
            live = keys - self.deleted[cc]
            checked += len(live)
            missing += len(live - found[cc])
            misrouted += sum(len(found[other] & keys) for other in found if other != cc)
        return {
            "acknowledged_writes_checked": checked,
            "acknowledged_writes_missing": missing,
            "records_in_another_country": misrouted,
        }


def sample(pid: int) -> dict[str, int]:
    p = psutil.Process(pid)
    return {"rss_bytes": p.memory_info().rss, "open_fds": p.num_fds()}


async def wait_up(url: str) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up")
            await asyncio.sleep(0.1)


async def run(duration: float, workers: int, fault_scale: float = 1.0) -> dict[str, Any]:
    sandbox_port, proxy_port = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp(prefix="incountry-soak-"))
    cfg = tmp / "proxy.yaml"
    cfg.write_text(yaml.safe_dump(proxy_config(sandbox_port, proxy_port)))
    exe = [sys.executable, "-m", "proxy"]
    sandbox_log = (tmp / "sandbox.log").open("wb")
    proxy_log = (tmp / "proxy.log").open("wb")
    env = {**os.environ, "INCOUNTRY_PROXY_LOG_LEVEL": "warning"}
    sandbox = subprocess.Popen(
        [*exe, "sandbox", "--port", str(sandbox_port), "--expires-in", "30", "--config", str(cfg)],
        stdout=sandbox_log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env,
    )
    proxy = subprocess.Popen(
        [*exe, "serve", "--config", str(cfg)], stdout=proxy_log, stderr=subprocess.STDOUT, cwd=ROOT, env=env
    )
    try:
        sandbox_url = f"http://127.0.0.1:{sandbox_port}"
        proxy_url = f"http://127.0.0.1:{proxy_port}"
        await wait_up(f"{sandbox_url}/_sandbox/stats")
        await wait_up(f"{proxy_url}/_proxy/health")
        soak = Soak(proxy_url, sandbox_url, duration, workers, fault_scale)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
            # One warm-up request so the start figures include the loaded code paths.
            async with http.post(f"{proxy_url}/de/api/records/find", json={}) as r:
                await r.read()
            start = sample(proxy.pid)
            started = time.monotonic()
            soak.stop_at = started + duration
            await asyncio.gather(soak.faults(http), *(soak.worker(i, http) for i in range(workers)))
            elapsed = time.monotonic() - started
            await asyncio.sleep(1)  # let in-flight work settle before the end sample
            end = sample(proxy.pid)
            async with http.get(f"{proxy_url}/_proxy/status") as r:
                status = await r.json()
            async with http.get(f"{sandbox_url}/_sandbox/stats") as r:
                stats = await r.json()
            async with http.get(f"{sandbox_url}/_sandbox/tokens/digests") as r:
                digests = set((await r.json())["sha256"])
            verification = await soak.verify(http)
        # With the clients gone and idle upstream connections expired (keepalive_timeout
        # 2 s here), descriptors must be back where they started: nothing leaked.
        await asyncio.sleep(4)
        end_idle = sample(proxy.pid)
    finally:
        for p in (proxy, sandbox):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        sandbox_log.close()
        proxy_log.close()

    outputs = (tmp / "proxy.log").read_text(errors="replace") + (tmp / "sandbox.log").read_text(
        errors="replace"
    )
    words = set(TOKEN_SHAPED.findall(outputs))
    leaks = (
        int(CLIENT_SECRET in outputs)
        + sum(1 for w in words if hashlib.sha256(w.encode()).hexdigest() in digests)
        + sum(1 for line in outputs.splitlines() if "Bearer " in line and "[redacted]" not in line)
    )
    total = sum(soak.outcomes.values())
    errors = {k: v for k, v in sorted(soak.outcomes.items()) if not k.split()[1].startswith(("2",))}
    return {
        "duration_seconds": round(elapsed, 1),
        "workers": workers,
        "requests": total,
        "requests_per_second": round(total / elapsed, 1),
        "outcomes": dict(sorted(soak.outcomes.items())),
        "errors_by_kind": errors,
        "proxy_start": start,
        "proxy_end": end,
        "proxy_end_idle": end_idle,
        "rss_growth_bytes": end["rss_bytes"] - start["rss_bytes"],
        "fd_growth_idle": end_idle["open_fds"] - start["open_fds"],
        "proxy_pool_at_end": status["pool"],
        "in_flight_at_end": sum(u["in_flight"] for u in status["upstreams"].values()),
        "sandbox_unauthorized": stats["unauthorized"],
        "injected_401": soak.injected_401,
        "token_requests": stats["token_requests"],
        **verification,
        "secret_leaks_in_output": leaks,
        "logs": str(tmp),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of traffic (default 600)")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--report", help="also write the JSON report to this file")
    parser.add_argument(
        "--fault-scale",
        type=float,
        default=1.0,
        help="multiply each fault phase's length (0.05 for a quick run)",
    )
    args = parser.parse_args()
    report = asyncio.run(run(args.duration, args.workers, args.fault_scale))
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")
    ok = (
        report["acknowledged_writes_missing"] == 0
        and report["records_in_another_country"] == 0
        and report["secret_leaks_in_output"] == 0
        and report["sandbox_unauthorized"] <= report["injected_401"]
        and report["in_flight_at_end"] == 0
        and report["fd_growth_idle"] <= 2
        and report["outcomes"].get("download CORRUPT", 0) == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
