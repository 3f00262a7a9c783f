"""Mutable run-time state of one sandbox: counters, issued tokens, records, files.

Everything the emulator remembers lives in one :class:`SandboxState` so that tests
can inspect it (``app[SANDBOX_STATE]``) and reset it between scenarios.

Requests are sorted into a :class:`Surface` (token endpoint, REST API, control)
before any handler runs. That classification is the seam for fault injection:
``SandboxState.faults`` (a :class:`~proxy.sandbox.faults.Faults`) is consulted by
the token endpoint and by the REST API's gate middleware (auth server down, junk
token responses, forced 401s and statuses, delays, throttled or cut downloads).
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.sandbox.faults import Faults, RestApiVerdict


class Surface(enum.StrEnum):
    """Which part of the emulated service a request is addressed to."""

    TOKEN = "token"  # noqa: S105 (a surface name, not a credential)
    RESTAPI = "restapi"
    CONTROL = "control"
    OTHER = "other"


@dataclass(frozen=True)
class IssuedToken:
    """What the sandbox remembers about an access token (never the token itself)."""

    client_id: str
    environment_id: str
    audience: frozenset[str]
    issued_at: float
    expires_at: float


@dataclass
class StoredRecord:
    """One record of one country, as last written."""

    fields: dict[str, Any]
    version: int
    created_at: str
    updated_at: str

    def to_json(self) -> dict[str, Any]:
        """The record as the REST API returns it."""
        return {
            **self.fields,
            "version": self.version,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class StoredFile:
    """One uploaded file attached to a record."""

    file_id: str
    filename: str
    mime_type: str
    data: bytes
    sha256: str

    @property
    def size(self) -> int:
        """Length of the file in bytes."""
        return len(self.data)

    def to_json(self) -> dict[str, Any]:
        """The file's metadata as the upload endpoint returns it."""
        return {
            "file_id": self.file_id,
            "filename": self.filename,
            "size": self.size,
            "mime_type": self.mime_type,
            "sha256": self.sha256,
        }


class SandboxState:
    """All mutable state of one sandbox app.

    Public counters (read by other test suites):

    - ``token_requests``: every POST to any token endpoint, successful or not;
      ``token_requests_by_path`` splits it by request path.
    - ``issued_tokens``: every access token ever issued, in order. It survives
      :meth:`reset` on purpose: leak checks scan output for all of them.
    - ``api_requests``: every request addressed to a country's REST API;
      ``unauthorized``: those answered 401.
    - ``writes``: successful record creates/overwrites plus file uploads.
    - ``records[cc][record_key]`` and ``files[cc][record_key][file_id]``: stores.
    - ``restapi_in_flight``: REST API requests being handled right now (from
      arrival, through any injected delay, until the last byte of the answer is
      written, downloads included); ``restapi_in_flight_max``: its high-water mark.
    - ``open_connections()``: TCP connections that have carried a REST API request
      and are still open; ``restapi_connections_max``: its high-water mark.
    - ``faults``: the active :class:`~proxy.sandbox.faults.Faults` (settable; see
      :meth:`set_faults`).

    :meth:`reset` clears faults and restarts both high-water marks from the
    current values (requests in flight and open connections are not forgotten).
    """

    def __init__(self) -> None:
        self.issued_tokens: list[str] = []
        self.restapi_in_flight = 0
        self._restapi_transports: set[asyncio.BaseTransport] = set()
        self._clear()

    def _clear(self) -> None:
        self.token_requests = 0
        self.token_requests_by_path: Counter[str] = Counter()
        self.tokens: dict[str, IssuedToken] = {}
        self.revoked_tokens: set[str] = set()
        self.api_requests = 0
        self.unauthorized = 0
        self.writes = 0
        self.records: dict[str, dict[str, StoredRecord]] = {}
        self.files: dict[str, dict[str, dict[str, StoredFile]]] = {}
        self.faults = Faults()
        self.restapi_in_flight_max = self.restapi_in_flight
        self.restapi_connections_max = self.open_connections()

    def reset(self) -> None:
        """Forget every counter, token, record, file and fault.

        Tokens issued before the reset become unknown (401). ``issued_tokens``
        keeps its history so that a leak scan still covers every token.
        """
        self._clear()

    def revoke_all_tokens(self) -> int:
        """Make every token issued so far invalid; return how many were live."""
        live = [t for t in self.tokens if t not in self.revoked_tokens]
        self.revoked_tokens.update(live)
        return len(live)

    def count_token_request(self, path: str) -> None:
        """Record one POST to a token endpoint at ``path``."""
        self.token_requests += 1
        self.token_requests_by_path[path] += 1

    def remember_token(self, token: str, grant: IssuedToken) -> None:
        """Store a freshly issued token so the REST API can accept it."""
        self.tokens[token] = grant
        self.issued_tokens.append(token)

    def token_problem(self, token: str, restapi_url: str, now: float) -> str | None:
        """Why ``token`` may not call the REST API at ``restapi_url``, or ``None`` if it may."""
        if token in self.revoked_tokens:
            return "token has been revoked"
        grant = self.tokens.get(token)
        if grant is None:
            return "unknown token"
        if now >= grant.expires_at:
            return "token has expired"
        if restapi_url not in grant.audience:
            return f"token audience does not include {restapi_url}"
        return None

    def live_token(
        self, client_id: str, audience: frozenset[str], now: float
    ) -> tuple[str, IssuedToken] | None:
        """The longest-lived usable token of ``client_id`` for exactly ``audience``, if any."""
        best: tuple[str, IssuedToken] | None = None
        for token, grant in self.tokens.items():
            if (
                grant.client_id == client_id
                and grant.audience == audience
                and now < grant.expires_at
                and token not in self.revoked_tokens
                and (best is None or grant.expires_at > best[1].expires_at)
            ):
                best = (token, grant)
        return best

    @staticmethod
    def remaining_lifetime(grant: IssuedToken, now: float) -> int:
        """Whole seconds ``grant`` has left, rounded up, at least 1 (an ``expires_in``)."""
        return max(1, math.ceil(grant.expires_at - now))

    # ------------------------------------------------------------------ faults

    def set_faults(self, spec: Mapping[str, Any] | Faults | None) -> Faults:
        """Replace the active faults with ``spec`` (the ``PUT /_sandbox/faults`` JSON shape,
        a :class:`Faults`, or ``None`` for none); return them.

        Raises :class:`~proxy.sandbox.faults.FaultSpecError` (a ``ValueError``)
        and changes nothing when ``spec`` is invalid.
        """
        self.faults = spec if isinstance(spec, Faults) else Faults.parse(spec)
        return self.faults

    def clear_faults(self) -> None:
        """Switch every fault off."""
        self.faults = Faults()

    def take_restapi_verdict(self) -> RestApiVerdict:
        """Decide what the faults do to an arriving REST API request, consuming countdowns."""
        verdict, self.faults = self.faults.after_restapi_request()
        return verdict

    # ------------------------------------------------------------------ load

    def restapi_started(self, transport: asyncio.BaseTransport | None) -> None:
        """Note a REST API request arriving on ``transport``; update the high-water marks."""
        self.restapi_in_flight += 1
        self.restapi_in_flight_max = max(self.restapi_in_flight_max, self.restapi_in_flight)
        if transport is not None and not transport.is_closing():
            self._restapi_transports.add(transport)
        self.restapi_connections_max = max(self.restapi_connections_max, self.open_connections())

    def restapi_finished(self) -> None:
        """Note a REST API request fully answered (or abandoned)."""
        self.restapi_in_flight -= 1

    def open_connections(self) -> int:
        """How many connections that carried a REST API request are still open."""
        closed = [t for t in self._restapi_transports if t.is_closing()]
        self._restapi_transports.difference_update(closed)
        return len(self._restapi_transports)

    def country_records(self, country: str) -> dict[str, StoredRecord]:
        """The record store of one country (created empty on first use)."""
        return self.records.setdefault(country, {})

    def record_files(self, country: str, record_key: str) -> dict[str, StoredFile]:
        """The files attached to one record (created empty on first use)."""
        return self.files.setdefault(country, {}).setdefault(record_key, {})

    def delete_record(self, country: str, record_key: str) -> bool:
        """Remove a record and its files; ``False`` when it did not exist."""
        store = self.records.get(country, {})
        if record_key not in store:
            return False
        del store[record_key]
        self.files.get(country, {}).pop(record_key, None)
        return True

    def stats(self) -> dict[str, Any]:
        """Counters safe to publish: no token, secret or record content."""
        return {
            "token_requests": self.token_requests,
            "token_requests_by_path": dict(self.token_requests_by_path),
            "tokens_issued": len(self.tokens),
            "tokens_revoked": len(self.revoked_tokens),
            "api_requests": self.api_requests,
            "unauthorized": self.unauthorized,
            "writes": self.writes,
            "restapi_in_flight": self.restapi_in_flight,
            "restapi_in_flight_max": self.restapi_in_flight_max,
            "restapi_open_connections": self.open_connections(),
            "restapi_connections_max": self.restapi_connections_max,
            "faults_active": self.faults.active,
            "records": {cc: len(store) for cc, store in sorted(self.records.items()) if store},
            "files": {
                cc: n
                for cc, by_record in sorted(self.files.items())
                if (n := sum(len(files) for files in by_record.values()))
            },
        }

    def __repr__(self) -> str:
        # Summarise: a repr that listed tokens would leak them into test output.
        return f"SandboxState({self.stats()!r})"
