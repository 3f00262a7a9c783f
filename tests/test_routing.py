"""Table tests for :func:`proxy.routing.resolve_country` (pure: no app, no network)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.config import Country, Routing, parse_config
from proxy.errors import RoutingError
from proxy.routing import Route, resolve_country

HEADER = "X-InCountry-Country"


def _countries() -> Mapping[str, Country]:
    doc = {
        "credentials": {"default": {"client_id": "cid", "client_secret": "sec", "environment_id": "env"}},
        "regions": {
            "emea": {"token_urls": ["https://idp.example/t/"]},
            "apac": {"token_urls": ["https://idp.example/t/"]},
        },
        "countries": {
            "de": {"region": "emea", "restapi_url": "https://de-restapi-mt-01.api.incountry.io"},
            "ca": {"region": "emea", "restapi_url": "https://ca-restapi-mt-01.api.incountry.io"},
            "au": {"region": "apac", "restapi_url": "https://au-restapi-mt-01.api.incountry.io"},
        },
    }
    return parse_config(doc, env={}).countries


COUNTRIES = _countries()
BOTH = Routing(country_header=HEADER, path_prefix=True)
HEADER_ONLY = Routing(country_header=HEADER, path_prefix=False)
PREFIX_ONLY = Routing(country_header=None, path_prefix=True)
CUSTOM_HEADER = Routing(country_header="X-Country", path_prefix=True)


def resolve(target: str, headers: Sequence[tuple[str, str]] = (), routing: Routing = BOTH) -> Route:
    return resolve_country(routing, COUNTRIES, target, CIMultiDict(headers))


def refused(target: str, headers: Sequence[tuple[str, str]] = (), routing: Routing = BOTH) -> str:
    with pytest.raises(RoutingError) as info:
        resolve(target, headers, routing)
    assert info.value.status == 400
    return info.value.detail


def test_countries_fixture() -> None:
    assert sorted(COUNTRIES) == ["au", "ca", "de"]


# --- accepted requests ------------------------------------------------------------------

OK: list[tuple[str, list[tuple[str, str]], Routing, str, str, str]] = [
    # target, headers, routing, country, forwarded target, source
    # header only
    ("/api/records/find", [(HEADER, "DE")], BOTH, "de", "/api/records/find", "header"),
    (
        "/api/records/find?limit=1",
        [(HEADER.lower(), "de")],
        BOTH,
        "de",
        "/api/records/find?limit=1",
        "header",
    ),
    ("/api/records", [(HEADER, "  au ")], BOTH, "au", "/api/records", "header"),
    ("/", [(HEADER, "ca")], BOTH, "ca", "/", "header"),
    ("/api/de/x", [(HEADER, "au")], BOTH, "au", "/api/de/x", "header"),  # only the first segment
    ("/api", [("X-Country", "de")], CUSTOM_HEADER, "de", "/api", "header"),
    # prefix only: stripped, query kept, raw encoding untouched
    ("/de/api/records/find", [], BOTH, "de", "/api/records/find", "path"),
    ("/de/api/records/find?limit=10&offset=0", [], BOTH, "de", "/api/records/find?limit=10&offset=0", "path"),
    ("/de", [], BOTH, "de", "/", "path"),
    ("/de/", [], BOTH, "de", "/", "path"),
    ("/de?x=1", [], BOTH, "de", "/?x=1", "path"),
    ("/de/api/a%2Fb?x=%20", [], BOTH, "de", "/api/a%2Fb?x=%20", "path"),
    (
        "/de/webapi/records/k%20%2B1/files?q=a%26b",
        [],
        BOTH,
        "de",
        "/webapi/records/k%20%2B1/files?q=a%26b",
        "path",
    ),
    ("/de//api", [], BOTH, "de", "//api", "path"),
    ("/au/api?next=/../de", [], BOTH, "au", "/api?next=/../de", "path"),  # query is not a path
    # case-insensitive
    ("/DE/api", [], BOTH, "de", "/api", "path"),
    ("/De/api", [], BOTH, "de", "/api", "path"),
    ("/DE/", [], BOTH, "de", "/", "path"),
    ("/api", [(HEADER, "De")], BOTH, "de", "/api", "header"),
    # both sources agreeing
    ("/de/api", [(HEADER, "DE")], BOTH, "de", "/api", "header+path"),
    ("/AU/api", [(HEADER, "au")], BOTH, "au", "/api", "header+path"),
    # the same country repeated
    ("/api", [(HEADER, "de"), (HEADER, "DE")], BOTH, "de", "/api", "header"),
    ("/api", [(HEADER, "de, de")], BOTH, "de", "/api", "header"),
    # header routing disabled: the header is ignored, even when it disagrees
    ("/au/api", [(HEADER, "DE")], PREFIX_ONLY, "au", "/api", "path"),
    ("/au/api", [(HEADER, "zz")], PREFIX_ONLY, "au", "/api", "path"),
    ("/au/api", [(HEADER, "de, ca")], PREFIX_ONLY, "au", "/api", "path"),
    # path prefix off: the path is forwarded untouched and the header decides
    ("/de/api", [(HEADER, "au")], HEADER_ONLY, "au", "/de/api", "header"),
    ("/de/api", [(HEADER, "de")], HEADER_ONLY, "de", "/de/api", "header"),
    ("/fr/api", [(HEADER, "de")], HEADER_ONLY, "de", "/fr/api", "header"),
]


@pytest.mark.parametrize(("target", "headers", "routing", "country", "forwarded", "source"), OK)
def test_resolves(
    target: str, headers: list[tuple[str, str]], routing: Routing, country: str, forwarded: str, source: str
) -> None:
    route = resolve(target, headers, routing)
    assert route.country is COUNTRIES[country]
    assert route.target == forwarded
    assert route.source == source


# --- refused requests -------------------------------------------------------------------

REFUSED: list[tuple[str, list[tuple[str, str]], Routing, list[str]]] = [
    # target, headers, routing, words the detail must contain
    # conflict
    ("/au/api", [(HEADER, "de")], BOTH, ["DE", "AU", HEADER]),
    ("/DE/api", [(HEADER, "Ca")], BOTH, ["DE", "CA"]),
    # unknown country
    ("/api", [(HEADER, "fr")], BOTH, ["'FR'", HEADER, "not configured", "AU, CA, DE"]),
    ("/api", [(HEADER, "deu")], BOTH, ["'DEU'"]),
    ("/fr/api", [], BOTH, ["'FR'", "/fr/", "AU, CA, DE"]),
    ("/FR/api", [(HEADER, "de")], BOTH, ["'FR'"]),  # unknown prefix even with a valid header
    ("/zz", [(HEADER, "au")], BOTH, ["'ZZ'"]),
    ("/us/api", [], PREFIX_ONLY, ["'US'"]),
    # no country
    ("/api/records/find", [], BOTH, ["no country", "/de/", f"{HEADER}: DE", "AU, CA, DE"]),
    ("/", [], BOTH, ["no country"]),
    ("/de/api", [], HEADER_ONLY, ["no country", f"{HEADER}: DE"]),
    ("/api", [(HEADER, "de")], PREFIX_ONLY, ["no country", "/de/"]),
    # two countries in the header
    ("/api", [(HEADER, "de, au")], BOTH, ["AU, DE", "several"]),
    ("/api", [(HEADER, "de,au")], BOTH, ["AU, DE"]),
    ("/api", [(HEADER, "de"), (HEADER, "au")], BOTH, ["AU, DE"]),
    ("/de/api", [(HEADER, "de"), (HEADER, "au")], BOTH, ["AU, DE"]),
    ("/api", [(HEADER, "de, fr")], BOTH, ["DE, FR"]),
    # empty header
    ("/api", [(HEADER, "")], BOTH, ["empty", HEADER]),
    ("/api", [(HEADER, " , ")], BOTH, ["empty"]),
    ("/de/api", [(HEADER, "")], BOTH, ["empty"]),
    # dot segments, literal or percent-encoded
    ("/de/../au/api", [], BOTH, ["'..'"]),
    ("/de/%2e%2e/au", [], BOTH, ["'..'"]),
    ("/de/%2e%2e%2fau/api", [], BOTH, ["'..'"]),  # dot segment behind an encoded slash
    ("/de/..%5cau/api", [], BOTH, ["'..'"]),  # backslash as a separator
    ("/de/%2E%2E/au/api", [], BOTH, ["'..'"]),
    ("/de/.%2e/au", [], BOTH, ["'..'"]),
    ("/de/./api", [], BOTH, ["'..'"]),
    ("/de/%2e/api", [], BOTH, ["'..'"]),
    ("/de/api/..", [], BOTH, ["'..'"]),
    ("/../de/api", [], BOTH, ["'..'"]),
    ("/api/../x", [(HEADER, "de")], HEADER_ONLY, ["'..'"]),
    # not origin-form
    ("http://proxy/de/api", [], BOTH, ["origin-form"]),
    ("de/api", [], BOTH, ["origin-form"]),
    ("*", [(HEADER, "de")], BOTH, ["origin-form"]),
    ("", [(HEADER, "de")], BOTH, ["origin-form"]),
    ("proxy:443", [(HEADER, "de")], BOTH, ["origin-form"]),
]


@pytest.mark.parametrize(("target", "headers", "routing", "words"), REFUSED)
def test_refuses(target: str, headers: list[tuple[str, str]], routing: Routing, words: list[str]) -> None:
    detail = refused(target, headers, routing)
    for word in words:
        assert word in detail, (word, detail)


def test_no_country_message_names_only_the_enabled_ways() -> None:
    header_only = refused("/api", [], HEADER_ONLY)
    assert HEADER in header_only and "/de/" not in header_only
    prefix_only = refused("/api", [], PREFIX_ONLY)
    assert "/de/" in prefix_only and HEADER not in prefix_only


def test_custom_header_name_is_used_and_default_ignored() -> None:
    assert resolve("/api", [("x-country", "AU")], CUSTOM_HEADER).country.code == "au"
    detail = refused("/api", [(HEADER, "de")], CUSTOM_HEADER)
    assert "X-Country" in detail


# --- property: never a country that no source named -------------------------------------

CONFIGURED = ("de", "au", "ca")
UNKNOWN = ("fr", "us", "zz", "in")


def _with_case(code: str, mask: int) -> str:
    return "".join(c.upper() if mask >> i & 1 else c.lower() for i, c in enumerate(code))


CODES = st.builds(_with_case, st.sampled_from(CONFIGURED + UNKNOWN), st.integers(0, 3))
# A first segment that is not a country (not two letters), so the path names nothing.
NOT_A_COUNTRY = st.sampled_from(("api", "webapi", "v1", "x", "a%2Fb"))


@settings(max_examples=300, deadline=None, database=None)
@given(
    header=st.none() | CODES,
    prefix=st.none() | CODES | NOT_A_COUNTRY,
    rest=st.sampled_from(("", "/", "/api/records/find", "/api/records/find?limit=1", "?q=de")),
    header_on=st.booleans(),
    prefix_on=st.booleans(),
)
def test_never_routes_to_a_country_no_source_named(
    header: str | None, prefix: str | None, rest: str, header_on: bool, prefix_on: bool
) -> None:
    routing = Routing(country_header=HEADER if header_on else None, path_prefix=prefix_on)
    target = f"/{prefix}{rest}" if prefix is not None else (rest if rest.startswith("/") else "/")
    headers = [(HEADER, header)] if header is not None else []

    named: set[str] = set()
    if header_on and header is not None:
        named.add(header.lower())
    if prefix_on and prefix is not None and len(prefix) == 2 and prefix.isalpha():
        named.add(prefix.lower())

    try:
        route = resolve_country(routing, COUNTRIES, target, CIMultiDict(headers))
    except RoutingError:
        # Liveness: one configured country, named consistently, is always accepted.
        assert not (len(named) == 1 and named <= set(CONFIGURED)), (target, headers, routing)
        return
    # Every enabled source that named a country named this one, and there was one.
    assert named == {route.country.code}, (target, headers, routing, route.country.code)
    if prefix_on and prefix is not None and prefix.lower() in CONFIGURED:
        assert route.target == (rest if rest.startswith("/") else "/" + rest)
    else:
        assert route.target == target
