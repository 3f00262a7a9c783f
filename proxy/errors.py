"""One small hierarchy for every error the proxy answers with itself.

Each error knows its HTTP status, which hop failed and what the caller can do; the
app maps them to ``application/problem+json`` (RFC 9457) in one place
(:func:`proxy.problems.problem_response`). Messages never carry a token or secret.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base class: an answer the proxy produces itself instead of the upstream's."""

    status: int = 500
    slug: str = "internal-error"
    title: str = "Internal proxy error"
    hop: str = "proxy"

    def __init__(
        self,
        detail: str,
        *,
        retry_after: int | None = None,
        extra: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        #: Extension members of the problem document (RFC 9457 §3.2).
        self.extra = extra or {}
        self.headers = headers or {}


class ConfigError(Exception):
    """The configuration is invalid; the message lists every problem, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


class RoutingError(ProxyError):
    """The request names no country, an unknown one, or two different ones."""

    status = 400
    slug = "routing"
    title = "Cannot decide the request's country"
    hop = "routing"


class BadRequestError(ProxyError):
    """The request cannot be forwarded as sent (method, path shape)."""

    status = 400
    slug = "bad-request"
    title = "Request refused by the proxy"
    hop = "client"


class MethodNotAllowedError(BadRequestError):
    status = 405
    slug = "method-not-allowed"
    title = "Method not allowed through the proxy"


class BodyTooLargeError(ProxyError):
    status = 413
    slug = "body-too-large"
    title = "Request body too large"
    hop = "client"


class TokenUnavailableError(ProxyError):
    """No valid access token could be obtained; the request was not forwarded."""

    status = 503
    slug = "token-unavailable"
    title = "No access token available for this country"
    hop = "token_server"


class UpstreamConnectError(ProxyError):
    status = 502
    slug = "upstream-connect"
    title = "Cannot connect to the country's REST API"
    hop = "upstream_connect"


class UpstreamTimeoutError(ProxyError):
    status = 504
    slug = "upstream-timeout"
    title = "The country's REST API did not answer in time"
    hop = "upstream_timeout"


class UpstreamProtocolError(ProxyError):
    status = 502
    slug = "upstream-protocol"
    title = "The country's REST API sent an invalid response"
    hop = "upstream_response"


class QueueFullError(ProxyError):
    """The upstream's quota is exhausted and the request could not wait any longer."""

    status = 429
    slug = "queue-full"
    title = "Too many requests for this country's REST API"
    hop = "queue"


class UpstreamUnauthorizedError(ProxyError):
    """The REST API refused the injected token and the request was not (or no more) replayable."""

    status = 401
    slug = "upstream-unauthorized"
    title = "The country's REST API refused the access token"
    hop = "upstream_auth"
