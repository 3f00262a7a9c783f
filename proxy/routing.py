"""Routing: which country a request belongs to. A compliance decision, so it never guesses.

:func:`resolve_country` is the one place where a request is given a country. It is a
pure function over the request target and headers, so every rule is table-tested.
New ways of naming a country (the target host, a forward-proxy target) join here.

Rules:
- The country comes from the configured header and/or the first path segment
  (``/de/api/records/find``) when ``path_prefix`` is on. Codes are case-insensitive.
- No country, an unknown country, or two sources naming different countries: 400
  before any token is fetched.
- With ``path_prefix`` on, a first segment of two letters that is not a configured
  country is refused, even when the header names a country: the caller evidently
  meant a country prefix, and forwarding elsewhere would be a guess.
- Dot segments (``.``/``..``, also percent-encoded) are refused: an upstream that
  normalises ``/de/../au/`` would move the request to another country's base path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from multidict import MultiMapping

from proxy.config import Country, Routing
from proxy.errors import RoutingError

_LOOKS_LIKE_COUNTRY = re.compile(r"^[A-Za-z]{2}$")


@dataclass(frozen=True, slots=True)
class Route:
    """The routing decision: the country, and the raw target to append to its upstream base."""

    country: Country
    #: Raw (still percent-encoded) path and query to forward, routing prefix removed.
    target: str
    #: What named the country: "header", "path" or "header+path".
    source: str


def _known(countries: Mapping[str, Country]) -> str:
    return ", ".join(sorted(c.upper() for c in countries))


def _header_country(header: str, headers: MultiMapping[str], countries: Mapping[str, Country]) -> str | None:
    values = headers.getall(header, [])
    if not values:
        return None
    names = {v.strip().lower() for raw in values for v in raw.split(",")}
    names.discard("")
    if not names:
        raise RoutingError(f"header {header} is present but empty; name one country, e.g. {header}: DE")
    if len(names) > 1:
        listed = ", ".join(sorted(n.upper() for n in names))
        raise RoutingError(
            f"header {header} names several countries ({listed}); send exactly one country per request"
        )
    (name,) = names
    if name not in countries:
        raise RoutingError(
            f"country {name.upper()!r} named by header {header} is not configured; "
            f"configured countries: {_known(countries)}"
        )
    return name


def _check_segments(path: str) -> None:
    # Decode first: "%2e%2e%2f" hides a dot segment behind an encoded slash, and some
    # servers treat a backslash as a separator too.
    for seg in re.split(r"[/\\]", unquote(path)):
        if seg in (".", ".."):
            raise RoutingError(
                "the path contains a '.' or '..' segment; send a normalised path "
                "(dot segments could move a request to another country's base path)"
            )


def resolve_country(
    routing: Routing,
    countries: Mapping[str, Country],
    raw_target: str,
    headers: MultiMapping[str],
) -> Route:
    """Decide the country of a request, or raise :class:`RoutingError` (400).

    ``raw_target`` is the request target as received (``request.raw_path``: path and
    query, percent-encoding intact). The returned :attr:`Route.target` is what goes
    upstream after the country's base path.
    """
    if not raw_target.startswith("/"):
        raise RoutingError(
            "only origin-form request targets (starting with '/') are accepted; "
            "send the request to the proxy as you would to the REST API"
        )
    path, sep, query = raw_target.partition("?")
    _check_segments(path)

    from_header = (
        _header_country(routing.country_header, headers, countries) if routing.country_header else None
    )

    from_path: str | None = None
    target = raw_target
    if routing.path_prefix:
        first, slash, rest = path[1:].partition("/")
        name = unquote(first)
        if name.lower() in countries and "/" not in name:
            from_path = name.lower()
            target = "/" + rest + sep + query if slash else "/" + sep + query
        elif _LOOKS_LIKE_COUNTRY.match(name):
            raise RoutingError(
                f"path prefix /{first}/ names country {name.upper()!r}, which is not configured; "
                f"configured countries: {_known(countries)}"
            )

    if from_header and from_path and from_header != from_path:
        raise RoutingError(
            f"header {routing.country_header} names {from_header.upper()} but the path prefix "
            f"names {from_path.upper()}; the request was not forwarded. Name one country only"
        )
    chosen = from_path or from_header
    if chosen is None:
        ways = []
        if routing.path_prefix:
            ways.append("prefix the path with the country code (/de/api/records/find)")
        if routing.country_header:
            ways.append(f"send the header {routing.country_header}: DE")
        raise RoutingError(
            "the request names no country; "
            + " or ".join(ways)
            + f". Configured countries: {_known(countries)}"
        )
    source = "header+path" if from_header and from_path else ("path" if from_path else "header")
    return Route(country=countries[chosen], target=target, source=source)
