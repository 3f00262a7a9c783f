"""Typed keys under which the sandbox app and its requests carry shared objects.

They live in their own module so that handler modules and ``app.py`` can import
them without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from proxy.sandbox.settings import SandboxSettings
from proxy.sandbox.state import SandboxState, Surface

SANDBOX_STATE: web.AppKey[SandboxState] = web.AppKey("sandbox_state", SandboxState)
SANDBOX_SETTINGS: web.AppKey[SandboxSettings] = web.AppKey("sandbox_settings", SandboxSettings)
SANDBOX_CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("sandbox_clock")

# Set by the outermost middleware on every request.
SURFACE: web.RequestKey[Surface] = web.RequestKey("sandbox_surface", Surface)
# The lower-case country code of a REST API request (from its first path segment).
COUNTRY: web.RequestKey[str] = web.RequestKey("sandbox_country", str)
# Set when an injected fault changed the answer (e.g. "token.down"); shown in the log line.
FAULT: web.RequestKey[str] = web.RequestKey("sandbox_fault", str)
