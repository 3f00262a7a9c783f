"""The command line and the set-up contract: serve, make run, the Dockerfile."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, free_port


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def test_serve_with_a_missing_variable_fails_naming_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INCOUNTRY_")}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", "config/incountry.yaml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=30,
    )
    assert result.returncode == 2
    lines = [json.loads(line) for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    problems = " ".join(p for line in lines for p in line.get("problems", []))
    assert "INCOUNTRY_CLIENT_SECRET" in problems
    assert "credentials.default.client_secret" in problems


def test_console_log_format_is_opt_in(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: {port: 1}\n")
    default = run_cli("serve", "--config", str(bad))
    console = run_cli("serve", "--config", str(bad), "--log-format", "console")
    assert default.returncode == console.returncode == 2
    assert all(json.loads(line) for line in default.stdout.splitlines() if line.strip())
    assert console.stdout.strip() and not console.stdout.lstrip().startswith("{")


def test_check_config_command_prints_the_routing_table() -> None:
    result = run_cli("check-config", "--config", "config/sandbox.yaml")
    assert result.returncode == 0
    for cc in ("CA", "US", "DE", "RU", "AE", "SA", "IN", "AU", "CN"):
        assert re.search(rf"^{cc}\s", result.stdout, re.M)
    assert "sandbox-secret" not in result.stdout + result.stderr


def test_make_run_answers_both_printed_curls(tmp_path: Path) -> None:
    proxy_port, sandbox_port = free_port(), free_port()
    env = {**os.environ, "PROXY_PORT": str(proxy_port), "SANDBOX_PORT": str(sandbox_port)}
    log = tmp_path / "make-run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "run"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        curls: list[str] = []
        while time.monotonic() < deadline and len(curls) < 2:
            assert proc.poll() is None, log.read_text()[-2000:]
            curls = [line for line in log.read_text().splitlines() if line.startswith("curl ")]
            time.sleep(0.2)
        assert len(curls) == 2, log.read_text()[-2000:]
        assert any("/de/api/records/find" in c for c in curls)
        assert any("X-InCountry-Country: DE" in c for c in curls)
        for curl in curls:
            result = subprocess.run(  # noqa: S602 (the exact line a person would paste)
                curl + " -o /dev/null -w '%{http_code}'",
                shell=True,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert result.stdout == "200", (curl, result.stdout, result.stderr)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("make run did not stop on Ctrl-C")
    # Both servers are gone: their ports can be bound again.
    import socket

    for port in (proxy_port, sandbox_port):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))


def test_dockerfile_contract() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])", text, re.M)
    cmd = re.search(r"^CMD\s+(\[.*\])", text, re.M)
    assert entry and json.loads(entry.group(1)) == ["incountry-proxy"]
    assert cmd and json.loads(cmd.group(1))[0] == "serve"


def test_shipped_configs_parse_as_yaml() -> None:
    for path in (ROOT / "config").glob("*.yaml"):
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_port_in_use_is_a_json_error_not_a_traceback(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "p.yaml"
        text = (ROOT / "config" / "sandbox.yaml").read_text()
        cfg.write_text(text)
        result = run_cli("serve", "--config", str(cfg), env={"PROXY_PORT": str(port)})
    assert result.returncode == 1
    lines = [json.loads(line) for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert any(e["event"] == "cannot_start" and "address" in e["error"].lower() for e in lines)
