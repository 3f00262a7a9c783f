"""Logging: JSON lines, redaction, and the suite's own secret scanner."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from proxy.logs import configure_logging, get_logger

pytest_plugins = ["pytester"]


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("json", "debug", stream=stream)
    yield stream
    configure_logging("json", "debug")


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_source_is_rendered_as_json(log_stream: io.StringIO) -> None:
    get_logger("proxy.test").info("structlog_event", n=1)
    logging.getLogger("aiohttp.server").error("stdlib %s", "event")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(False)
        logging.captureWarnings(True)  # re-installed over pytest's own warning capture
        warnings.warn("a warning", UserWarning, stacklevel=1)
    events = lines(log_stream)
    assert [e["event"] for e in events][:2] == ["structlog_event", "stdlib event"]
    assert any("a warning" in str(e["event"]) for e in events)
    assert all("timestamp" in e and "level" in e for e in events)


def test_secrets_are_redacted_whatever_the_shape(log_stream: io.StringIO) -> None:
    log = get_logger("proxy.test")
    log.info("kv", access_token="tok-AAA", client_secret="sec-BBB")
    log.info("nested", headers={"Authorization": "Bearer tok-CCC", "X-Other": "fine"})
    log.info("text", detail="upstream said: Authorization: Bearer tok-DDD.eee")
    try:
        raise RuntimeError("failed with basic dXNlcjpzZWNyZXQ=")
    except RuntimeError:
        log.exception("boom")
    out = log_stream.getvalue()
    for secret in ("tok-AAA", "sec-BBB", "tok-CCC", "tok-DDD", "dXNlcjpzZWNyZXQ="):
        assert secret not in out
    assert "fine" in out


def test_structlog_is_configured_for_stdlib() -> None:
    assert structlog.is_configured()


def test_suite_fails_a_test_that_prints_a_secret(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("from tests.conftest import pytest_runtest_makereport, SECRETS  # noqa: F401\n")
    pytester.makepyfile(
        """
        from tests.conftest import SECRETS

        def test_leaky():
            SECRETS.static.add("canary-secret-value-42")
            print("token is canary-secret-value-42")

        def test_clean():
            print("nothing to see")
        """
    )
    from tests.conftest import SECRETS

    try:
        result = pytester.runpytest_inprocess(
            "-p", "no:cacheprovider", "-o", "asyncio_default_fixture_loop_scope=function"
        )
    finally:
        SECRETS.static.discard("canary-secret-value-42")  # the outer run must not flag it
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*SECRET LEAK*test_leaky*"])
    assert "canary-secret-value-42" not in result.stdout.str()
