"""The emulated OAuth2 token endpoint (``POST [/{name}]/oauth2/token/``).

It enforces every rule InCountry documents for a ``client_credentials`` grant,
and answers a broken rule with the RFC 6749 error a real server would give, so
that a client which passes here builds its token requests correctly.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
from dataclasses import dataclass
from urllib.parse import unquote_plus

from aiohttp import hdrs, web
from yarl import URL

from proxy.sandbox.errors import OAuthError, oauth_error_response
from proxy.sandbox.faults import JUNK_TOKEN_MODES, TokenMode
from proxy.sandbox.inject import broken_token_answer, junk_token_answer
from proxy.sandbox.keys import SANDBOX_CLOCK, SANDBOX_SETTINGS, SANDBOX_STATE
from proxy.sandbox.settings import SandboxClient, SandboxSettings
from proxy.sandbox.state import IssuedToken

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
GRANT_TYPE = "client_credentials"

_INVALID_CLIENT_HEADERS = {"WWW-Authenticate": 'Basic realm="incountry"'}
_INVALID_CLIENT_HINT = "Send HTTP Basic authentication with a registered client_id and its client_secret."


@dataclass(frozen=True)
class TokenRequest:
    """A token request that passed every rule."""

    client: SandboxClient
    restapi_url: str
    storage_url: str


async def token_endpoint(request: web.Request) -> web.StreamResponse:
    """Issue an access token for a valid client_credentials request.

    Every POST is counted (``token_requests``) whatever its outcome. On success
    the answer is 200 ``{"access_token", "expires_in", "scope", "token_type"}``
    with ``Cache-Control: no-store``; otherwise an RFC 6749 error (see
    :func:`check_token_request` for the rules).

    Token faults covering this path (``state.faults.token``) apply after the
    count: first ``delay``; then modes down/error/empty/malformed answer without
    checking the request; modes wrong_type/no_expiry/same_token check it first.
    """
    state = request.app[SANDBOX_STATE]
    settings = request.app[SANDBOX_SETTINGS]
    state.count_token_request(request.path)
    faults = state.faults.token_faults_for(request.path)
    if faults is not None:
        if faults.delay > 0:
            await asyncio.sleep(faults.delay)
        broken = broken_token_answer(request, faults)
        if broken is not None:
            return broken
    try:
        grant = await check_token_request(request, settings)
    except OAuthError as exc:
        return oauth_error_response(exc)

    mode = None if faults is None else faults.mode
    if mode in JUNK_TOKEN_MODES:
        assert mode is not None
        return junk_token_answer(request, mode, grant.client.environment_id, settings.expires_in)

    now = request.app[SANDBOX_CLOCK]()
    audience = frozenset({grant.restapi_url, grant.storage_url})
    live = state.live_token(grant.client.client_id, audience, now) if mode is TokenMode.SAME_TOKEN else None
    if live is not None:
        token, issued = live
        expires_in = state.remaining_lifetime(issued, now)
    else:
        token = secrets.token_urlsafe(32)
        expires_in = settings.expires_in
        state.remember_token(
            token,
            IssuedToken(
                client_id=grant.client.client_id,
                environment_id=grant.client.environment_id,
                audience=audience,
                issued_at=now,
                expires_at=now + settings.expires_in,
            ),
        )
    body = {
        "access_token": token,
        "expires_in": expires_in,
        "scope": grant.client.environment_id,
        "token_type": "bearer",
    }
    return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


async def check_token_request(request: web.Request, settings: SandboxSettings) -> TokenRequest:
    """Validate a token request, raising :class:`OAuthError` at the first broken rule.

    Rules, in the order checked: a non-empty ``User-Agent``; HTTP Basic
    credentials of a configured client (401 ``invalid_client``); a form-encoded
    body; ``grant_type=client_credentials``; ``scope`` equal to the client's
    environment id; ``audience`` = ``"{restapi_url} {storage_url}"``.
    """
    if not request.headers.get(hdrs.USER_AGENT, "").strip():
        raise OAuthError(
            "invalid_request",
            "User-Agent header is mandatory",
            "Send any non-empty User-Agent header with the token request.",
        )

    client = _authenticate_client(request.headers.get(hdrs.AUTHORIZATION), settings)

    if request.content_type != FORM_CONTENT_TYPE:
        raise OAuthError(
            "invalid_request",
            f"Content-Type must be {FORM_CONTENT_TYPE}, got {request.content_type or 'none'}",
            "Send the parameters as an application/x-www-form-urlencoded body.",
        )
    form = await request.post()
    params: dict[str, str] = {}
    for name in set(form.keys()):
        values = form.getall(name)
        if len(values) > 1:
            # RFC 6749 section 3.2: parameters must not be included more than once.
            raise OAuthError(
                "invalid_request",
                f"parameter {name!r} is repeated",
                "Send each parameter once.",
            )
        value = values[0]
        if not isinstance(value, str):
            raise OAuthError(
                "invalid_request",
                f"parameter {name!r} must be text",
                "Send the parameters as an application/x-www-form-urlencoded body.",
            )
        params[name] = value

    grant_type = params.get("grant_type", "")
    if not grant_type:
        raise OAuthError(
            "invalid_request",
            "The grant_type parameter is missing",
            f"Set grant_type={GRANT_TYPE}.",
        )
    if grant_type != GRANT_TYPE:
        raise OAuthError(
            "unsupported_grant_type",
            f"The grant type {grant_type!r} is not supported",
            f"Only grant_type={GRANT_TYPE} is accepted.",
        )

    scope = params.get("scope", "")
    if not scope:
        raise OAuthError(
            "invalid_request",
            "The scope parameter is missing",
            "Set scope to the environment id.",
        )
    if scope != client.environment_id:
        raise OAuthError(
            "invalid_scope",
            "The requested scope is not the client's environment id",
            "Set scope to the environment id the client belongs to.",
        )

    restapi_url, storage_url = parse_audience(params.get("audience", ""))
    return TokenRequest(client=client, restapi_url=restapi_url, storage_url=storage_url)


def parse_audience(audience: str) -> tuple[str, str]:
    """Split and check ``"{restapi_url} {storage_url}"``; return both URLs.

    Raises ``invalid_request`` when the value is missing or not two absolute
    http(s) URLs separated by exactly one space, and ``invalid_target`` when the
    second URL is not the first with ``-restapi`` removed.
    """
    hint = "Send audience='{restapi_url} {storage_url}', storage_url being restapi_url minus '-restapi'."
    if not audience:
        raise OAuthError("invalid_request", "The audience parameter is missing", hint)
    parts = audience.split(" ")
    if len(parts) != 2 or not all(parts):
        raise OAuthError(
            "invalid_request",
            f"audience must be exactly two URLs separated by one space, got {len(parts)} "
            "space-separated part(s)",
            hint,
        )
    for part in parts:
        if not _is_absolute_http_url(part):
            raise OAuthError(
                "invalid_request", f"audience entry {part!r} is not an absolute http(s) URL", hint
            )
    restapi_url, storage_url = parts
    expected = restapi_url.replace("-restapi", "")
    if storage_url != expected:
        raise OAuthError(
            "invalid_target",
            f"the second audience URL must be the first with '-restapi' removed: expected "
            f"{expected!r}, got {storage_url!r}",
            hint,
        )
    return restapi_url, storage_url


def _is_absolute_http_url(value: str) -> bool:
    try:
        url = URL(value)
    except (ValueError, TypeError):
        return False
    return url.scheme in ("http", "https") and bool(url.host) and url.is_absolute()


def _authenticate_client(header: str | None, settings: SandboxSettings) -> SandboxClient:
    """The configured client named by Basic credentials, else ``invalid_client`` (401).

    The failure does not say whether the id or the secret was wrong.
    """
    if not header:
        raise _invalid_client("Client authentication is missing (HTTP Basic required)")
    login, password = _decode_basic(header)
    # RFC 6749 section 2.3.1 form-encodes id and secret before Basic encoding;
    # many clients do not, so accept both spellings.
    candidates = {
        (login, password),
        (unquote_plus(login), unquote_plus(password)),
    }
    for client_id, secret in candidates:
        client = settings.client(client_id)
        if client is not None and secrets.compare_digest(secret.encode(), client.client_secret.encode()):
            return client
    raise _invalid_client("Client authentication failed")


def _decode_basic(header: str) -> tuple[str, str]:
    """``(client_id, client_secret)`` from a Basic Authorization header, else ``invalid_client``."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise _invalid_client("Client authentication must use HTTP Basic")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (ValueError, binascii.Error):
        raise _invalid_client("The Authorization header is not valid HTTP Basic") from None
    login, colon, password = decoded.partition(":")
    if not colon:
        raise _invalid_client("The Authorization header is not valid HTTP Basic")
    return login, password


def _invalid_client(description: str) -> OAuthError:
    return OAuthError("invalid_client", description, _INVALID_CLIENT_HINT, 401, _INVALID_CLIENT_HEADERS)
