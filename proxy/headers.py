"""Header rewriting between client and upstream: pure functions over multidicts.

Implements RFC 9110 §7.6.1 (hop-by-hop headers, including those named in
``Connection``), §7.6.3 (``Via``) and the de-facto ``X-Forwarded-*`` headers.
Framing headers are never copied: aiohttp re-frames both directions.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from multidict import CIMultiDict, MultiMapping

# RFC 9110 §7.6.1, plus the legacy names proxies still meet (RFC 2616 §13.5.1).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "trailer",
    }
)

FORWARDING = frozenset({"forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"})

# Request headers the proxy replaces or must not pass on:
# - Host is the upstream's own; Authorization is the injected token's.
# - Expect: aiohttp's server already answered "100 Continue"; forwarding it would make
#   the client wait for a second one.
REQUEST_REPLACED = frozenset({"host", "authorization", "expect"})

# Response framing is recomputed by aiohttp; Content-Length is set via content_length.
RESPONSE_REPLACED = frozenset({"content-length", "transfer-encoding"})

VIA_VALUE = "1.1 incountry-proxy"


def connection_tokens(headers: MultiMapping[str]) -> frozenset[str]:
    """Header names listed in ``Connection`` (RFC 9110 §7.6.1), lower-cased."""
    return frozenset(
        t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",") if t.strip()
    )


def strip_hop_by_hop(headers: MultiMapping[str], drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """A copy without hop-by-hop headers, those named in ``Connection`` and ``drop``.

    Repeated headers (``Set-Cookie``) keep every value, in order.
    """
    dropped = HOP_BY_HOP | connection_tokens(headers) | frozenset(d.lower() for d in drop)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in dropped:
            out.add(name, value)
    return out


def is_trusted(peer: str | None, trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    """Whether ``peer`` (an IP string) is one of the configured trusted proxies."""
    if not peer or not trusted:
        return False
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return any(addr in net for net in trusted)


def upstream_request_headers(
    incoming: MultiMapping[str],
    *,
    drop: frozenset[str],
    authorization: str,
    upstream_host: str,
    peer: str | None,
    client_host: str | None,
    client_proto: str,
    trust_forwarded: bool,
) -> CIMultiDict[str]:
    """Headers for the upstream request.

    ``drop`` holds extra lower-case names to remove (the routing header). Inbound
    ``X-Forwarded-*``/``Forwarded`` are kept and extended only when the peer is a
    trusted proxy; otherwise they are replaced, so a client cannot forge them.
    """
    out = strip_hop_by_hop(
        incoming, drop | REQUEST_REPLACED | (frozenset() if trust_forwarded else FORWARDING)
    )
    out["Host"] = upstream_host
    out["Authorization"] = authorization
    if peer:
        prior = ", ".join(out.getall("X-Forwarded-For", []))
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    if "X-Forwarded-Proto" not in out:
        out["X-Forwarded-Proto"] = client_proto
    if client_host and "X-Forwarded-Host" not in out:
        out["X-Forwarded-Host"] = client_host
    out.add("Via", VIA_VALUE)
    return out


def client_response_headers(upstream: MultiMapping[str]) -> CIMultiDict[str]:
    """Headers for the client's response: hop-by-hop and framing removed, ``Via`` added."""
    out = strip_hop_by_hop(upstream, RESPONSE_REPLACED)
    out.add("Via", VIA_VALUE)
    return out
