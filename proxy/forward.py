"""The forwarder: one request from the client to its country's REST API and back.

The journey is: refuse what cannot be forwarded safely → :func:`resolve_country` →
admission to the country's quota → :meth:`TokenProvider.get` → rewrite headers →
send the body up → stream the answer down. Bodies are streamed (small ones with a
``Content-Length`` are buffered so that a 401 can be replayed); memory stays flat
whatever their size, and backpressure flows both ways through aiohttp's buffers.

Hook points for what comes next are the methods of :class:`Forwarder`:
``admit`` (quotas now, access control later) wraps everything after routing;
``exchange`` is one upstream round trip (the 401 replay loops over it);
``relay`` streams the answer (capture taps in there).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.config import Config, Country
from proxy.errors import (
    BadRequestError,
    BodyTooLargeError,
    MethodNotAllowedError,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
    UpstreamUnauthorizedError,
)
from proxy.headers import client_response_headers, is_trusted, upstream_request_headers
from proxy.logs import get_logger
from proxy.quota import UpstreamQuota
from proxy.routing import Route, resolve_country
from proxy.streams import read_prefix
from proxy.tokens import Token, TokenProvider

log = get_logger("proxy.forward")

# Headers aiohttp's client would add on its own: absent must stay absent, or the
# upstream may, for example, compress a response for a client that never asked.
SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})

# TRACE would echo the injected token back to the client; CONNECT is not a REST call.
REFUSED_METHODS = frozenset({"TRACE", "CONNECT"})
# The methods a REST API call uses. Anything else (including odd spellings such as
# "get", which aiohttp's parser accepts) is refused rather than passed on.
FORWARDED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

NO_BODY_STATUSES = frozenset({204, 304})

# How much of an upstream 401 body is read (and quoted in the problem document).
MAX_401_BODY = 16 * 1024

REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
ROUTE: web.RequestKey[Route] = web.RequestKey("route", Route)
UPSTREAM_STATUS: web.RequestKey[int] = web.RequestKey("upstream_status", int)
REPLAYED: web.RequestKey[bool] = web.RequestKey("replayed", bool)


class UpstreamAborted(Exception):
    """The transfer broke after the response started: the client connection must drop.

    Finishing the response would let a truncated body look complete. ``response`` is
    the response already under way, if any.
    """

    def __init__(self, reason: str, response: web.StreamResponse | None = None) -> None:
        super().__init__(reason)
        self.response = response


class BodyStream:
    """The client's request body as an async iterator, counted against a limit.

    aiohttp's ``client_max_size`` only bounds ``request.read()``, so streamed bodies
    are counted here. Exceeding the limit stops the upload and records why, so the
    caller can answer 413 instead of a generic upstream error.
    """

    def __init__(self, request: web.Request, limit: int) -> None:
        self._content = request.content
        self.limit = limit
        self.received = 0
        self.exceeded = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._content.iter_any():
            self.received += len(chunk)
            if self.received > self.limit:
                self.exceeded = True
                raise BodyTooLargeError(too_large(self.limit))
            yield chunk


def too_large(limit: int) -> str:
    return (
        f"the request body exceeds the proxy's limit of {limit} bytes (limits.max_body_size); "
        "send a smaller body"
    )


@dataclass(frozen=True, slots=True)
class Body:
    """What goes upstream: nothing, a buffered body (replayable), or a one-shot stream."""

    buffered: bytes | None = None
    stream: BodyStream | None = None

    @property
    def replayable(self) -> bool:
        return self.stream is None

    def data(self) -> bytes | AsyncIterator[bytes] | None:
        return self.stream.__aiter__() if self.stream is not None else self.buffered


class Forwarder:
    """Forwards requests per the configuration, injecting each country's token."""

    def __init__(
        self,
        config: Config,
        tokens: TokenProvider,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._tokens = tokens
        self._session = session
        header = config.routing.country_header
        self._drop = frozenset({header.lower()}) if header else frozenset()
        self._max_body = config.limits.max_body_size
        self._replay_limit = min(config.upstream.replay_buffer_size, self._max_body)
        self.quotas = {cc: UpstreamQuota(cc, c.quota, clock) for cc, c in config.countries.items()}
        # Idle-read and connect timeouts per country; the first-byte timeout is applied
        # around the wait for the response headers.
        self._timeouts = {
            cc: aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=c.timeouts.connect, sock_read=c.timeouts.read
            )
            for cc, c in config.countries.items()
        }

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Route, admit, authenticate and forward ``request``; raise a ProxyError to refuse."""
        self.check_request(request)
        route = resolve_country(
            self._config.routing, self._config.countries, request.raw_path, request.headers
        )
        request[ROUTE] = route
        async with self.admit(request, route):
            body = await self.read_body(request)
            return await self.send(request, route, body)

    def check_request(self, request: web.Request) -> None:
        if request.method not in FORWARDED_METHODS:
            why = (
                "it could expose the injected credentials"
                if request.method in REFUSED_METHODS
                else "it is not a REST API method"
            )
            raise MethodNotAllowedError(
                f"{request.method!r} is not forwarded ({why}); "
                "use GET, POST, PUT, PATCH, DELETE, HEAD or OPTIONS",
                headers={"Allow": ", ".join(sorted(FORWARDED_METHODS))},
            )
        if request.version not in (aiohttp.HttpVersion10, aiohttp.HttpVersion11):
            raise BadRequestError(
                f"HTTP/{request.version.major}.{request.version.minor} is not supported; use HTTP/1.1"
            )
        length = request.content_length
        if length is not None and length > self._max_body:
            raise BodyTooLargeError(
                f"Content-Length {length} is larger than allowed: " + too_large(self._max_body)
            )

    def admit(self, request: web.Request, route: Route) -> AbstractAsyncContextManager[None]:
        """Admission to the country's upstream, held until the answer is relayed.

        Raises :class:`QueueFullError` (429) when the quota's queue is full or its
        deadline passes. Access control will join here.
        """
        return self.quotas[route.country.code].slot()

    async def read_body(self, request: web.Request) -> Body:
        """Buffer small bodies with a known length (replayable); stream all others."""
        if not request.body_exists:
            return Body()
        length = request.content_length
        if length is not None and length <= self._replay_limit:
            try:
                return Body(buffered=await request.content.readexactly(length) if length else b"")
            except (asyncio.IncompleteReadError, aiohttp.ClientError, ConnectionError):
                raise UpstreamAborted("client went away during the upload") from None
        return Body(stream=BodyStream(request, self._max_body))

    async def send(self, request: web.Request, route: Route, body: Body) -> web.StreamResponse:
        """Send with the country's token; after a 401, replay once with a fresh token.

        The rejected token is dropped only if it is still the cached one. A request
        whose body was streamed cannot be replayed: its caller gets a 401 problem
        saying so. A request is never replayed twice.
        """
        country = route.country
        token = await self._tokens.get(country)
        upstream = await self.exchange(request, route, token, body)
        if upstream.status != 401:
            return await self.relay(request, upstream)

        detail, www_auth = await _read_401(upstream)
        dropped = self._tokens.invalidate(country, token)
        log.warning("upstream_401", country=country.code, token_dropped=dropped, replayable=body.replayable)
        if not body.replayable:
            raise _unauthorized(
                f"{country.code.upper()}'s REST API refused the access token (401). The request was "
                "not retried because its body was streamed (chunked, or larger than "
                f"upstream.replay_buffer_size = {self._replay_limit} bytes) and cannot be sent twice; "
                "the rejected token was dropped, so sending the request again uses a fresh one",
                detail,
                www_auth,
            )
        token = await self._tokens.get(country)
        request[REPLAYED] = True
        upstream = await self.exchange(request, route, token, body)
        if upstream.status != 401:
            return await self.relay(request, upstream)
        detail, www_auth = await _read_401(upstream)
        self._tokens.invalidate(country, token)
        raise _unauthorized(
            f"{country.code.upper()}'s REST API refused a freshly fetched access token too (401), "
            "so the request was not retried again. Check that the credentials and the country's "
            "restapi_url/storage_url match what InCountry expects",
            detail,
            www_auth,
        )

    async def exchange(
        self, request: web.Request, route: Route, token: Token, body: Body
    ) -> aiohttp.ClientResponse:
        """One round trip up to the response headers; the caller owns the response."""
        country = route.country
        url = URL(country.upstream_base + route.target, encoded=True)
        peer = request.remote
        headers = upstream_request_headers(
            request.headers,
            drop=self._drop,
            authorization=token.authorization,
            upstream_host=country.upstream_host,
            peer=peer,
            client_host=request.host,
            client_proto=request.scheme,
            trust_forwarded=is_trusted(peer, self._config.forwarded.trusted_proxies),
        )
        request_id = request.get(REQUEST_ID)
        if request_id and "X-Request-Id" not in headers:
            headers["X-Request-Id"] = request_id  # the same id in the proxy's and the upstream's logs
        # A streamed upload may take long; then only the idle-read timeout applies.
        first_byte = None if body.stream is not None else country.timeouts.first_byte
        try:
            async with asyncio.timeout(first_byte):
                upstream = await self._session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=body.data(),
                    skip_auto_headers=SKIP_AUTO_HEADERS,
                    allow_redirects=False,
                    auto_decompress=False,
                    timeout=self._timeouts[country.code],
                )
        except aiohttp.ClientConnectorError as e:
            raise UpstreamConnectError(
                f"cannot connect to {country.code.upper()}'s REST API at {country.upstream_host} "
                f"({_connect_reason(e)}); retry later, and tell the "
                "proxy's operators if it persists"
            ) from None
        except aiohttp.ServerTimeoutError:
            self._check_body(body)
            raise _timeout(country, None) from None
        except TimeoutError:
            self._check_body(body)
            raise _timeout(country, first_byte) from None
        except aiohttp.ClientError as e:
            self._check_body(body)
            if request.transport is None or request.transport.is_closing():
                raise UpstreamAborted("client went away during the upload") from None
            raise UpstreamProtocolError(
                f"the exchange with {country.code.upper()}'s REST API at {country.upstream_host} "
                f"failed before an answer ({type(e).__name__}); the request may or may not have been "
                "applied, so check before retrying a write"
            ) from None
        request[UPSTREAM_STATUS] = upstream.status
        return upstream

    @staticmethod
    def _check_body(body: Body) -> None:
        if body.stream is not None and body.stream.exceeded:
            raise BodyTooLargeError(too_large(body.stream.limit))

    async def relay(self, request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        """Stream the upstream's answer to the client, byte for byte (no decompression).

        The upstream connection goes back to the pool only after a complete body; on
        any failure it is closed, never returned half-read.
        """
        async with upstream:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=client_response_headers(upstream.headers),
            )
            request_id = request.get(REQUEST_ID)
            if request_id and "X-Request-Id" not in response.headers:
                response.headers["X-Request-Id"] = request_id
            length = _content_length(upstream)
            if length is not None and upstream.status not in NO_BODY_STATUSES and upstream.status >= 200:
                response.content_length = length
            await response.prepare(request)
            if request.method == "HEAD" or upstream.status in NO_BODY_STATUSES:
                await response.write_eof()
                return response
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError, OSError) as e:
                # Never write_eof() here: with chunked framing it would send the last chunk
                # and the client would take a truncated body for a complete one.
                upstream.close()
                raise UpstreamAborted(f"transfer broke mid-body: {type(e).__name__}", response) from None
            except BaseException:  # the client went away (handler cancelled): drop upstream too
                upstream.close()
                raise
            await response.write_eof()
            return response


def _content_length(upstream: aiohttp.ClientResponse) -> int | None:
    """The upstream's body length, or None when it is not length-framed.

    aiohttp's response parser is lenient, so conflicting framing (RFC 9112 §6.3) is
    refused here: relaying it could desynchronise the client's connection.
    """
    lengths = upstream.headers.getall("Content-Length", [])
    chunked = "Transfer-Encoding" in upstream.headers
    values = {v.strip() for raw in lengths for v in raw.split(",")}
    if lengths and (chunked or len(values) != 1 or not next(iter(values)).isdigit()):
        raise UpstreamProtocolError(
            "the REST API sent conflicting or invalid message framing "
            f"(Content-Length {', '.join(lengths)!r}{' with Transfer-Encoding' if chunked else ''}); "
            "the answer was not relayed. Retry later, and tell the proxy's operators if it persists"
        )
    return int(next(iter(values))) if lengths else None


async def _read_401(upstream: aiohttp.ClientResponse) -> tuple[object, str | None]:
    """Read and release a 401 answer; return its body (parsed JSON if it is) and challenge."""
    async with upstream:
        raw = await read_prefix(upstream.content, MAX_401_BODY)
        www_auth = upstream.headers.get("WWW-Authenticate")
    try:
        parsed: object = json.loads(raw)
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    return parsed, www_auth


def _connect_reason(e: aiohttp.ClientConnectorError) -> str:
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        return "its TLS certificate did not verify"
    if isinstance(e, aiohttp.ClientSSLError):
        return "the TLS handshake failed"
    return e.strerror or type(e).__name__


def _unauthorized(detail: str, upstream_body: object, www_auth: str | None) -> UpstreamUnauthorizedError:
    return UpstreamUnauthorizedError(
        detail,
        extra={"upstream_status": 401, "upstream_body": upstream_body},
        headers={"WWW-Authenticate": www_auth} if www_auth else None,
    )


def _timeout(country: Country, first_byte: float | None) -> UpstreamTimeoutError:
    waited = (
        f"sent no answer within {first_byte:g}s (first_byte_timeout)"
        if first_byte is not None
        else f"was silent for {country.timeouts.read:g}s (read_timeout)"
    )
    return UpstreamTimeoutError(
        f"{country.code.upper()}'s REST API at {country.upstream_host} {waited}; the request may or "
        "may not have been applied, so check before retrying a write"
    )
