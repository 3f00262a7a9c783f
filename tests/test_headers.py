"""Table tests for :mod:`proxy.headers`: hop-by-hop stripping, forwarding headers, trust."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.headers import (
    client_response_headers,
    is_trusted,
    strip_hop_by_hop,
    upstream_request_headers,
)

# RFC 9110 §7.6.1 plus the legacy names the proxy notes list; written out here on purpose,
# not imported, so that a name dropped from the module's set fails these tests.
HOP_BY_HOP = (
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "TE",
    "Transfer-Encoding",
    "Upgrade",
    "Proxy-Authorization",
    "Proxy-Authenticate",
)
VIA = "1.1 incountry-proxy"
Pairs = list[tuple[str, str]]


def items(h: Any) -> Pairs:
    return list(h.items())


# --- strip_hop_by_hop -------------------------------------------------------------------

STRIP: list[tuple[str, Pairs, Pairs]] = [
    (
        "every RFC hop-by-hop header, any case",
        [("Accept", "*/*")]
        + [(n, "x") for n in HOP_BY_HOP]
        + [(n.upper(), "y") for n in HOP_BY_HOP]
        + [(n.lower(), "z") for n in HOP_BY_HOP]
        + [("Content-Type", "application/json")],
        [("Accept", "*/*"), ("Content-Type", "application/json")],
    ),
    (
        "headers named in Connection, case-insensitive, comma list",
        [
            ("Connection", "X-Foo, x-BAR ,keep-alive"),
            ("x-foo", "1"),
            ("X-Bar", "2"),
            ("X-Baz", "3"),
            ("Keep-Alive", "timeout=5"),
        ],
        [("X-Baz", "3")],
    ),
    (
        "several Connection headers",
        [
            ("Connection", "X-A"),
            ("X-A", "1"),
            ("connection", "x-b,  X-C"),
            ("X-B", "2"),
            ("X-C", "3"),
            ("X-D", "4"),
        ],
        [("X-D", "4")],
    ),
    (
        "Connection: close removes only itself",
        [("Connection", "close"), ("Accept", "a"), ("Content-Length", "3")],
        [("Accept", "a"), ("Content-Length", "3")],
    ),
    (
        "empty Connection tokens are ignored",
        [("Connection", " , ,"), ("Accept", "a")],
        [("Accept", "a")],
    ),
    (
        "repeated Set-Cookie kept in order",
        [
            ("Set-Cookie", "a=1"),
            ("Content-Type", "text/plain"),
            ("Set-Cookie", "b=2"),
            ("set-cookie", "c=3"),
            ("Connection", "keep-alive"),
            ("Keep-Alive", "timeout=5"),
        ],
        [("Set-Cookie", "a=1"), ("Content-Type", "text/plain"), ("Set-Cookie", "b=2"), ("set-cookie", "c=3")],
    ),
    (
        "names that merely contain a hop-by-hop name are kept",
        [("X-Connection", "1"), ("Upgrade-Insecure-Requests", "1"), ("TE-X", "2"), ("Trailer-Extra", "3")],
        [("X-Connection", "1"), ("Upgrade-Insecure-Requests", "1"), ("TE-X", "2"), ("Trailer-Extra", "3")],
    ),
]


@pytest.mark.parametrize(
    ("incoming", "expected"), [(i, e) for _, i, e in STRIP], ids=[name for name, _, _ in STRIP]
)
def test_strip_hop_by_hop(incoming: Pairs, expected: Pairs) -> None:
    src = CIMultiDict(incoming)
    out = strip_hop_by_hop(src)
    assert isinstance(out, CIMultiDict)
    assert items(out) == expected
    assert items(src) == incoming  # the input is not modified


def test_strip_hop_by_hop_also_drops_extra_names_any_case() -> None:
    src = CIMultiDictProxy(CIMultiDict([("X-InCountry-Country", "DE"), ("Accept", "a"), ("TE", "trailers")]))
    assert items(strip_hop_by_hop(src, drop=["x-incountry-country"])) == [("Accept", "a")]
    assert items(strip_hop_by_hop(src, drop=("X-INCOUNTRY-COUNTRY",))) == [("Accept", "a")]


# Hostile input: arbitrary names and values; the hop-by-hop names appear in random case.

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
TOKENS = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12)


def _with_case(name: str, mask: int) -> str:
    return "".join(c.upper() if mask >> i & 1 else c.lower() for i, c in enumerate(name))


RANDOM_CASE_HOP = st.builds(_with_case, st.sampled_from(HOP_BY_HOP), st.integers(0, 2**20))
NAMES = st.one_of(
    RANDOM_CASE_HOP, TOKENS, st.sampled_from(("Set-Cookie", "X-Foo", "x-foo", "Content-Length"))
)
OWS = st.sampled_from(("", " ", "\t", "  "))
CONNECTION_VALUE = st.lists(st.tuples(OWS, NAMES, OWS), max_size=4).map(
    lambda ts: ",".join(a + n + b for a, n, b in ts)
)
HEADER = st.one_of(
    st.tuples(NAMES, st.text(max_size=20)),
    st.tuples(st.sampled_from(("Connection", "connection", "CONNECTION")), CONNECTION_VALUE),
)


@settings(max_examples=200, deadline=None, database=None)
@given(headers=st.lists(HEADER, max_size=12), drop=st.lists(NAMES, max_size=2))
def test_no_hop_by_hop_header_ever_survives(headers: Pairs, drop: list[str]) -> None:
    out = strip_hop_by_hop(CIMultiDict(headers), drop)
    named = {t.strip(" \t").lower() for n, v in headers if n.lower() == "connection" for t in v.split(",")}
    banned = {n.lower() for n in HOP_BY_HOP} | named | {d.lower() for d in drop}
    for name in out:
        assert name.lower() not in banned, name
    # Nothing else is lost, and order and repeats are kept.
    assert items(out) == [(n, v) for n, v in headers if n.lower() not in banned]


# --- upstream_request_headers -----------------------------------------------------------

UPSTREAM_HOST = "de-restapi-mt-01.api.incountry.io"
TOKEN = "Bearer injected-token"


def upstream(
    incoming: Pairs,
    *,
    trusted: bool = False,
    peer: str | None = "10.0.0.1",
    client_host: str | None = "proxy.local:8080",
    client_proto: str = "https",
) -> CIMultiDict[str]:
    return upstream_request_headers(
        CIMultiDictProxy(CIMultiDict(incoming)),
        drop=frozenset({"x-incountry-country"}),
        authorization=TOKEN,
        upstream_host=UPSTREAM_HOST,
        peer=peer,
        client_host=client_host,
        client_proto=client_proto,
        trust_forwarded=trusted,
    )


def test_upstream_host_and_authorization_replaced() -> None:
    out = upstream(
        [
            ("Host", "proxy.local:8080"),
            ("Authorization", "Bearer client-own"),
            ("authorization", "Basic Zm9vOmJhcg=="),
        ]
    )
    assert out.getall("Host") == [UPSTREAM_HOST]
    assert out.getall("Authorization") == [TOKEN]


@pytest.mark.parametrize(
    ("incoming", "gone", "kept"),
    [
        ([("Expect", "100-continue"), ("Content-Length", "10")], "Expect", ("Content-Length", "10")),
        ([("X-InCountry-Country", "DE"), ("Accept", "*/*")], "X-InCountry-Country", ("Accept", "*/*")),
        ([("x-incountry-country", "de"), ("Accept", "*/*")], "X-InCountry-Country", ("Accept", "*/*")),
        (
            [("Transfer-Encoding", "chunked"), ("Content-Type", "application/json")],
            "Transfer-Encoding",
            ("Content-Type", "application/json"),
        ),
        ([("Content-Length", "42"), ("TE", "trailers")], "TE", ("Content-Length", "42")),
        (
            [("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"), ("User-Agent", "sdk")],
            "X-Hop",
            ("User-Agent", "sdk"),
        ),
        (
            [("Proxy-Authorization", "Basic abc"), ("Accept-Encoding", "gzip")],
            "Proxy-Authorization",
            ("Accept-Encoding", "gzip"),
        ),
        ([("Upgrade", "websocket"), ("Content-Encoding", "gzip")], "Upgrade", ("Content-Encoding", "gzip")),
    ],
)
def test_upstream_request_drops_and_keeps(incoming: Pairs, gone: str, kept: tuple[str, str]) -> None:
    out = upstream(incoming)
    assert gone not in out
    assert out.getall(kept[0]) == [kept[1]]


def test_upstream_request_keeps_end_to_end_headers_in_order() -> None:
    incoming = [
        ("Content-Type", "application/json"),
        ("X-Custom", "1"),
        ("Accept", "a"),
        ("X-Custom", "2"),
        ("Content-Length", "2"),
    ]
    out = upstream(incoming)
    assert [
        (n, v) for n, v in out.items() if n in {"Content-Type", "X-Custom", "Accept", "Content-Length"}
    ] == incoming


FORGED = [
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Proto", "http"),
    ("Forwarded", "for=6.6.6.6;host=evil.example;proto=http"),
]


def test_untrusted_peer_forwarding_headers_replaced() -> None:
    out = upstream(FORGED, trusted=False)
    assert out.getall("X-Forwarded-For") == ["10.0.0.1"]
    assert out.getall("X-Forwarded-Host") == ["proxy.local:8080"]
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert "Forwarded" not in out
    assert not any("6.6.6.6" in v or "evil" in v for v in out.values())


def test_untrusted_forwarding_header_names_any_case() -> None:
    out = upstream([(n.lower(), v) for n, v in FORGED] + [(n.upper(), v) for n, v in FORGED])
    assert out.getall("X-Forwarded-For") == ["10.0.0.1"]
    assert "Forwarded" not in out


def test_untrusted_without_peer_or_client_host_adds_nothing_forged() -> None:
    out = upstream(FORGED, peer=None, client_host=None, client_proto="http")
    assert "X-Forwarded-For" not in out
    assert "X-Forwarded-Host" not in out
    assert out.getall("X-Forwarded-Proto") == ["http"]


def test_trusted_peer_appends_to_x_forwarded_for_and_keeps_the_rest() -> None:
    out = upstream(
        [
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Forwarded-Proto", "http"),
            ("X-Forwarded-Host", "api.customer.example"),
            ("Forwarded", "for=1.2.3.4"),
        ],
        trusted=True,
    )
    assert out.getall("X-Forwarded-For") == ["1.2.3.4, 10.0.0.1"]
    assert out.getall("X-Forwarded-Proto") == ["http"]
    assert out.getall("X-Forwarded-Host") == ["api.customer.example"]
    assert out.getall("Forwarded") == ["for=1.2.3.4"]


def test_trusted_peer_appends_to_every_x_forwarded_for_line() -> None:
    """Repeated header lines are one comma list (RFC 9110 §5.3); no hop may be lost."""
    out = upstream([("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-For", "5.6.7.8")], trusted=True)
    assert ", ".join(out.getall("X-Forwarded-For")) == "1.2.3.4, 5.6.7.8, 10.0.0.1"


def test_trusted_peer_without_inbound_headers_sets_them() -> None:
    out = upstream([], trusted=True, peer="2001:db8::1")
    assert out.getall("X-Forwarded-For") == ["2001:db8::1"]
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out.getall("X-Forwarded-Host") == ["proxy.local:8080"]


def test_via_added_after_existing_via() -> None:
    assert upstream([]).getall("Via") == [VIA]
    assert upstream([("Via", "1.0 corp-proxy")]).getall("Via") == ["1.0 corp-proxy", VIA]


def test_upstream_request_does_not_modify_input() -> None:
    src = CIMultiDict([("Host", "h"), ("X-Forwarded-For", "1.2.3.4")])
    upstream_request_headers(
        src,
        drop=frozenset(),
        authorization=TOKEN,
        upstream_host="u",
        peer="10.0.0.1",
        client_host="h",
        client_proto="https",
        trust_forwarded=True,
    )
    assert items(src) == [("Host", "h"), ("X-Forwarded-For", "1.2.3.4")]


# --- client_response_headers ------------------------------------------------------------


def test_client_response_headers() -> None:
    out = client_response_headers(
        CIMultiDict(
            [
                ("Content-Type", "application/json"),
                ("Content-Length", "123"),
                ("Transfer-Encoding", "chunked"),
                ("Content-Encoding", "gzip"),
                ("ETag", '"abc"'),
                ("Set-Cookie", "a=1; Path=/"),
                ("Connection", "keep-alive, X-Upstream-Hop"),
                ("Keep-Alive", "timeout=5"),
                ("X-Upstream-Hop", "1"),
                ("Proxy-Authenticate", "Basic"),
                ("Set-Cookie", "b=2; Path=/"),
            ]
        )
    )
    assert items(out) == [
        ("Content-Type", "application/json"),
        ("Content-Encoding", "gzip"),
        ("ETag", '"abc"'),
        ("Set-Cookie", "a=1; Path=/"),
        ("Set-Cookie", "b=2; Path=/"),
        ("Via", VIA),
    ]


# --- is_trusted -------------------------------------------------------------------------

NETS = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("192.168.1.7/32"),
    ipaddress.ip_network("::1/128"),
)


@pytest.mark.parametrize(
    ("peer", "trusted", "expected"),
    [
        ("10.0.0.1", NETS, True),
        ("10.255.255.255", NETS, True),
        ("192.168.1.7", NETS, True),
        ("::1", NETS, True),
        ("11.0.0.1", NETS, False),
        ("192.168.1.8", NETS, False),
        ("::2", NETS, False),
        ("10.0.0.1", (), False),
        ("10.0.0.1", (ipaddress.ip_network("::/0"),), False),  # v4 is not inside a v6 network
        (None, NETS, False),
        ("", NETS, False),
        ("not-an-ip", NETS, False),
        ("10.0.0.1 ", NETS, False),
        ("10.0.0.256", NETS, False),
        ("10.0.0.0/8", NETS, False),
        ("localhost", NETS, False),
    ],
)
def test_is_trusted(peer: str | None, trusted: tuple[Any, ...], expected: bool) -> None:
    assert is_trusted(peer, trusted) is expected
