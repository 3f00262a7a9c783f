"""The fault model: what can be switched on, validated strictly (pure data, no I/O).

A :class:`Faults` value says how the sandbox should misbehave. It lives on
``SandboxState.faults``; tests set it over HTTP (``PUT /_sandbox/faults`` with the
JSON shape below) or in process (``state.set_faults({...})`` or
``state.faults = Faults.parse({...})``)::

    {
      "token":   {"mode": "down", "paths": ["/idp/oauth2/token/"], "delay": 0.5, "status": 503},
      "restapi": {"unauthorized": 2, "delay": 1.0, "status": 503, "status_count": 3,
                  "throttle_bytes_per_second": 1000000, "die_after_bytes": 100000}
    }

Every key is optional; ``{}`` means no fault. Unknown keys, unknown modes, wrong
types and out-of-range values raise :class:`FaultSpecError`. :meth:`Faults.to_json`
gives the same shape with every default filled in, and parses back unchanged.

The values are immutable; the REST API's countdowns (``unauthorized``,
``status_count``) are consumed by replacing ``state.faults`` with
:meth:`Faults.after_restapi_request`'s result.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

# Longest accepted delay: a typo in units (ms for s) should fail, not hang a test.
MAX_DELAY = 3600.0
DEFAULT_TOKEN_ERROR_STATUS = 503
# The token paths the sandbox serves: /oauth2/token[/] and /{name}/oauth2/token[/].
TOKEN_PATH_RE = re.compile(r"^(?:/[A-Za-z0-9._~-]+)?/oauth2/token/?$")


class FaultSpecError(ValueError):
    """A fault specification was refused; ``source`` names the offending key (``token.mode``; "" for all)."""

    def __init__(self, message: str, source: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.source = source


class TokenMode(enum.StrEnum):
    """How the token endpoint misbehaves."""

    DOWN = "down"  # abort the connection without answering
    ERROR = "error"  # RFC 6749 server_error with TokenFaults.status
    EMPTY = "empty"  # 200 with an empty body
    MALFORMED = "malformed"  # 200 with a body that is not JSON
    WRONG_TYPE = "wrong_type"  # 200 with token_type "mac"
    NO_EXPIRY = "no_expiry"  # 200 without expires_in
    SAME_TOKEN = "same_token"  # noqa: S105 (a mode name) - hand back a live token again


# Modes that answer without looking at the request (the server is broken).
BROKEN_MODES = frozenset({TokenMode.DOWN, TokenMode.ERROR, TokenMode.EMPTY, TokenMode.MALFORMED})
# Modes whose 200 answer carries a token string that is not usable.
JUNK_TOKEN_MODES = frozenset({TokenMode.WRONG_TYPE, TokenMode.NO_EXPIRY})


def _check_delay(value: float, source: str) -> None:
    if not math.isfinite(value) or not 0 <= value <= MAX_DELAY:
        raise FaultSpecError(f"{source} must be a number of seconds from 0 to {MAX_DELAY:g}", source)


def _check_error_status(value: int, source: str) -> None:
    if not 400 <= value <= 599:
        raise FaultSpecError(f"{source} must be an HTTP error status from 400 to 599", source)


def _check_count(value: int | None, source: str) -> None:
    if value is not None and value < 0:
        raise FaultSpecError(f"{source} must not be negative", source)


@dataclass(frozen=True)
class TokenFaults:
    """Faults of the token endpoint.

    ``paths`` limits them to those exact request paths (``None``: every token
    path). ``delay`` (seconds) precedes the answer, whatever ``mode`` is;
    ``status`` is the status of mode ``error`` (ignored by the other modes).
    """

    mode: TokenMode | None = None
    paths: tuple[str, ...] | None = None
    delay: float = 0.0
    status: int = DEFAULT_TOKEN_ERROR_STATUS

    def __post_init__(self) -> None:
        if self.mode is not None and not isinstance(self.mode, TokenMode):
            try:
                object.__setattr__(self, "mode", TokenMode(self.mode))
            except ValueError:
                raise _unknown_mode(self.mode) from None
        if self.paths is not None:
            paths = tuple(self.paths)
            if not paths:
                raise FaultSpecError(
                    "token.paths must not be empty (leave it out to cover every token path)", "token.paths"
                )
            for path in paths:
                if not isinstance(path, str) or not TOKEN_PATH_RE.match(path):
                    raise FaultSpecError(
                        f"token.paths entry {path!r} is not a token path "
                        "(/oauth2/token/ or /{name}/oauth2/token/, with or without the trailing slash)",
                        "token.paths",
                    )
            object.__setattr__(self, "paths", paths)
        _check_delay(self.delay, "token.delay")
        _check_error_status(self.status, "token.status")

    @property
    def active(self) -> bool:
        """Whether any token request would be treated differently."""
        return self.mode is not None or self.delay > 0

    def applies_to(self, path: str) -> bool:
        """Whether these faults cover a token request to ``path`` (and change anything)."""
        return self.active and (self.paths is None or path in self.paths)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": None if self.mode is None else self.mode.value,
            "paths": None if self.paths is None else list(self.paths),
            "delay": self.delay,
            "status": self.status,
        }


@dataclass(frozen=True)
class RestApiFaults:
    """Faults of every country's REST API (requests to ``/{cc}/...``).

    - ``unauthorized``: the next N requests are answered 401 before any handler.
    - ``delay``: seconds each request waits before it is handled.
    - ``status`` / ``status_count``: the next ``status_count`` requests (every
      request while ``status_count`` is ``None``) are answered ``status``.
    - ``throttle_bytes_per_second``: file downloads stream at about this rate.
    - ``die_after_bytes``: file downloads stop after this many bytes and the
      connection is closed (Content-Length still announces the whole file).
    """

    unauthorized: int = 0
    delay: float = 0.0
    status: int | None = None
    status_count: int | None = None
    throttle_bytes_per_second: float | None = None
    die_after_bytes: int | None = None

    def __post_init__(self) -> None:
        _check_count(self.unauthorized, "restapi.unauthorized")
        _check_delay(self.delay, "restapi.delay")
        if self.status is not None:
            _check_error_status(self.status, "restapi.status")
        elif self.status_count is not None:
            raise FaultSpecError("restapi.status_count needs restapi.status", "restapi.status_count")
        _check_count(self.status_count, "restapi.status_count")
        rate = self.throttle_bytes_per_second
        if rate is not None and (not math.isfinite(rate) or rate <= 0):
            raise FaultSpecError(
                "restapi.throttle_bytes_per_second must be a positive number",
                "restapi.throttle_bytes_per_second",
            )
        _check_count(self.die_after_bytes, "restapi.die_after_bytes")

    @property
    def forced_status(self) -> int | None:
        """The status the next request gets from the ``status`` fault, if any."""
        if self.status is None or self.status_count == 0:
            return None
        return self.status

    @property
    def shapes_downloads(self) -> bool:
        """Whether file downloads are throttled or cut short."""
        return self.throttle_bytes_per_second is not None or self.die_after_bytes is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "unauthorized": self.unauthorized,
            "delay": self.delay,
            "status": self.status,
            "status_count": self.status_count,
            "throttle_bytes_per_second": self.throttle_bytes_per_second,
            "die_after_bytes": self.die_after_bytes,
        }


@dataclass(frozen=True)
class RestApiVerdict:
    """What the REST API faults decided for one request, at its arrival."""

    delay: float = 0.0
    unauthorized: bool = False
    status: int | None = None


@dataclass(frozen=True)
class Faults:
    """All active faults; ``Faults()`` is none."""

    token: TokenFaults = field(default_factory=TokenFaults)
    restapi: RestApiFaults = field(default_factory=RestApiFaults)

    @classmethod
    def parse(cls, spec: object) -> Faults:
        """Faults from the JSON shape of ``PUT /_sandbox/faults``; ``None`` means none.

        Raises :class:`FaultSpecError` on anything unknown or invalid.
        """
        if spec is None:
            return cls()
        top = _object(spec, "", {"token", "restapi"})
        token = _object(top.get("token"), "token", {"mode", "paths", "delay", "status"})
        restapi = _object(
            top.get("restapi"),
            "restapi",
            {
                "unauthorized",
                "delay",
                "status",
                "status_count",
                "throttle_bytes_per_second",
                "die_after_bytes",
            },
        )
        mode = token.get("mode")
        if mode is not None and not isinstance(mode, str):
            raise _unknown_mode(mode)
        paths = token.get("paths")
        if paths is not None and (not isinstance(paths, list) or not all(isinstance(p, str) for p in paths)):
            raise FaultSpecError("token.paths must be a list of strings", "token.paths")
        status = _integer(token, "status", "token")
        return cls(
            token=TokenFaults(
                mode=None if mode is None else _mode(mode),
                paths=None if paths is None else tuple(paths),
                delay=_number(token, "delay", "token") or 0.0,
                status=DEFAULT_TOKEN_ERROR_STATUS if status is None else status,
            ),
            restapi=RestApiFaults(
                unauthorized=_integer(restapi, "unauthorized", "restapi") or 0,
                delay=_number(restapi, "delay", "restapi") or 0.0,
                status=_integer(restapi, "status", "restapi"),
                status_count=_integer(restapi, "status_count", "restapi"),
                throttle_bytes_per_second=_number(restapi, "throttle_bytes_per_second", "restapi"),
                die_after_bytes=_integer(restapi, "die_after_bytes", "restapi"),
            ),
        )

    def to_json(self) -> dict[str, Any]:
        """The ``GET /_sandbox/faults`` shape: every key, defaults filled in, countdowns as they stand."""
        return {"token": self.token.to_json(), "restapi": self.restapi.to_json()}

    @property
    def active(self) -> bool:
        """Whether anything differs from ``Faults()``."""
        return self != Faults()

    def token_faults_for(self, path: str) -> TokenFaults | None:
        """The token faults that apply to a token request to ``path``, or ``None``."""
        return self.token if self.token.applies_to(path) else None

    def after_restapi_request(self) -> tuple[RestApiVerdict, Faults]:
        """Decide the fate of one arriving REST API request and consume its countdowns.

        In order: a pending ``unauthorized`` wins (and only it is decremented);
        otherwise a pending ``status``. ``delay`` applies either way. Returns the
        verdict and the faults that remain.
        """
        rest = self.restapi
        if rest.unauthorized > 0:
            remaining = replace(rest, unauthorized=rest.unauthorized - 1)
            return RestApiVerdict(delay=rest.delay, unauthorized=True), replace(self, restapi=remaining)
        status = rest.forced_status
        if status is not None:
            if rest.status_count is not None:
                rest = replace(rest, status_count=rest.status_count - 1)
            return RestApiVerdict(delay=rest.delay, status=status), replace(self, restapi=rest)
        return RestApiVerdict(delay=rest.delay), self


# --------------------------------------------------------------------------- JSON helpers


def _object(value: object, source: str, allowed: set[str]) -> Mapping[str, object]:
    if value is None:
        return {}
    name = source or "the fault specification"
    if not isinstance(value, dict):
        raise FaultSpecError(f"{name} must be a JSON object", source)
    unknown = sorted(str(k) for k in set(value) - allowed)
    if unknown:
        prefix = f"{source}." if source else ""
        raise FaultSpecError(
            f"unknown key(s) in {name}: {', '.join(unknown)} (known: {', '.join(sorted(allowed))})",
            f"{prefix}{unknown[0]}",
        )
    return value


def _mode(value: str) -> TokenMode:
    try:
        return TokenMode(value)
    except ValueError:
        raise _unknown_mode(value) from None


def _unknown_mode(value: object) -> FaultSpecError:
    known = ", ".join(m.value for m in TokenMode)
    return FaultSpecError(f"unknown token.mode {value!r} (known: {known}, or null)", "token.mode")


def _number(obj: Mapping[str, object], key: str, section: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultSpecError(f"{section}.{key} must be a number", f"{section}.{key}")
    return float(value)


def _integer(obj: Mapping[str, object], key: str, section: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FaultSpecError(f"{section}.{key} must be an integer", f"{section}.{key}")
    return value
