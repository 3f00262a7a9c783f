"""Structured logging: JSON lines by default, a console format on request.

Every line the process writes goes through structlog, including records from the
standard ``logging`` module (aiohttp's own loggers) and ``warnings``, so that a log
pipeline can parse all of stdout/stderr. A redaction processor runs last before
rendering: secrets must never reach a log line, whatever a caller passes in.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["json", "console"]

REDACTED = "[redacted]"

# Keys whose values are secrets wherever they appear in an event.
SECRET_KEYS = frozenset(
    {
        "access_token",
        "refresh_token",
        "token",
        "client_secret",
        "secret",
        "password",
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
    }
)

# Credentials embedded in free text (exception messages, reprs).
_BEARER_RE = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _BEARER_RE.sub(lambda m: f"{m.group(1)} {REDACTED}", value)
    if isinstance(value, dict):
        return {k: (REDACTED if str(k).lower() in SECRET_KEYS else _scrub(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: replace secret-named keys and inline credentials."""
    for key in list(event_dict):
        if key.lower() in SECRET_KEYS:
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


class _CurrentStdout:
    """Writes to whatever ``sys.stdout`` is at the time (test runners swap it)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


def configure_logging(fmt: LogFormat = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Route structlog, stdlib logging and warnings to ``stream`` in one format."""
    out: Any = stream if stream is not None else _CurrentStdout()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            redact_secrets,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_incountry_proxy", False):
            root.removeHandler(old)
    handler._incountry_proxy = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric_level)
    logging.captureWarnings(True)


def get_logger(name: str) -> Any:
    """A structlog logger bound to ``name`` (the module that logs)."""
    return structlog.get_logger(name)
