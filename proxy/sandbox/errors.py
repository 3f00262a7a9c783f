"""The two error dialects the sandbox speaks.

The token endpoint answers like an RFC 6749 authorization server
(``{"error", "error_description", "error_hint", "status_code"}``); the REST API
answers with ``{"errors": [{"title", "source", "detail"}]}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus

from aiohttp import web


class OAuthError(Exception):
    """A token request broke a rule; rendered by :func:`oauth_error_response`."""

    def __init__(
        self,
        error: str,
        description: str,
        hint: str = "",
        status: int = 400,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.hint = hint
        self.status = status
        self.headers = dict(headers or {})


class ApiError(Exception):
    """A REST API request failed; rendered by :func:`api_error_response`."""

    def __init__(
        self,
        status: int,
        detail: str,
        source: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.source = source
        self.headers = dict(headers or {})


def oauth_error_response(exc: OAuthError) -> web.Response:
    """An RFC 6749 error response; never cacheable, like every token response."""
    body = {
        "error": exc.error,
        "error_description": exc.description,
        "error_hint": exc.hint,
        "status_code": exc.status,
    }
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache", **exc.headers}
    return web.json_response(body, status=exc.status, headers=headers)


def api_error_response(exc: ApiError) -> web.Response:
    """A REST API error response in the ``{"errors": [...]}`` shape."""
    body = {"errors": [{"title": _title(exc.status), "source": exc.source, "detail": exc.detail}]}
    return web.json_response(body, status=exc.status, headers=exc.headers)


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
