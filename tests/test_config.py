"""Table tests for :mod:`proxy.config` and the ``check-config`` command (no network)."""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import EXIT_CONFIG, main
from proxy.config import (
    Config,
    Credentials,
    Secret,
    load_config,
    parse_config,
    routing_table,
    storage_url_for,
)
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
INCOUNTRY_YAML = ROOT / "config" / "incountry.yaml"
SANDBOX_YAML = ROOT / "config" / "sandbox.yaml"

SECRET = "s3cr3t-cfg-7Qx9-never-print"
ENV = {
    "INCOUNTRY_CLIENT_ID": "client-id-123",
    "INCOUNTRY_CLIENT_SECRET": SECRET,
    "INCOUNTRY_ENVIRONMENT_ID": "env-456",
}
EMEA = ("ca", "us", "de", "ru", "ae", "sa", "in")
APAC = ("au", "cn")
IDP = "https://idp.incountry.com/oauth2/token/"


def base_doc() -> dict[str, Any]:
    """A small valid document; tests copy and break it."""
    return {
        "listen": {"host": "127.0.0.1", "port": 8080},
        "credentials": {
            "default": {"client_id": "cid", "client_secret": SECRET, "environment_id": "env"},
            "other": {"client_id": "cid2", "client_secret": "other-secret", "environment_id": "env2"},
        },
        "regions": {"emea": {"token_urls": ["https://idp.example/oauth2/token/"]}},
        "countries": {
            "de": {"region": "emea", "restapi_url": "https://de-restapi-mt-01.api.incountry.io"},
        },
    }


def problems_of(doc: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, env={} if env is None else env)
    assert info.value.problems, "a ConfigError must list at least one problem"
    # The message repeats every problem, so a log line carries them all.
    for p in info.value.problems:
        assert p in str(info.value)
    return info.value.problems


# --- the shipped configurations ---------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> Config:
    return load_config(INCOUNTRY_YAML, env=ENV)


def test_shipped_config_has_exactly_the_seed_countries(shipped: Config) -> None:
    assert sorted(shipped.countries) == sorted(EMEA + APAC)
    assert shipped.warnings == ()
    assert shipped.routing.country_header == "X-InCountry-Country"
    assert shipped.routing.path_prefix is True
    assert (shipped.listen.host, shipped.listen.port) == ("127.0.0.1", 8080)


@pytest.mark.parametrize(("cc", "region"), [(cc, "emea") for cc in EMEA] + [(cc, "apac") for cc in APAC])
def test_shipped_country_urls_audience_and_region(shipped: Config, cc: str, region: str) -> None:
    c = shipped.countries[cc]
    restapi = f"https://{cc}-restapi-mt-01.api.incountry.io"
    storage = f"https://{cc}-mt-01.api.incountry.io"
    assert c.code == cc
    assert str(c.restapi_url) == restapi
    assert str(c.storage_url) == storage
    assert c.audience == f"{restapi} {storage}"
    assert c.upstream_base == restapi
    assert c.upstream_host == f"{cc}-restapi-mt-01.api.incountry.io"
    assert c.insecure is False
    assert c.region.name == region
    assert str(c.region.token_urls[0]) == IDP
    assert str(c.region.token_urls[1]) == f"https://auth-{region}.incountry.com/oauth2/token/"
    assert c.credentials.name == "default"
    assert c.credentials.client_id == "client-id-123"
    assert c.credentials.environment_id == "env-456"
    assert c.credentials.client_secret.reveal() == SECRET


def test_shipped_config_without_env_names_every_missing_variable() -> None:
    problems = problems_of_file(INCOUNTRY_YAML, {})
    for key, var in [
        ("credentials.default.client_id", "INCOUNTRY_CLIENT_ID"),
        ("credentials.default.client_secret", "INCOUNTRY_CLIENT_SECRET"),
        ("credentials.default.environment_id", "INCOUNTRY_ENVIRONMENT_ID"),
    ]:
        matching = [p for p in problems if p.startswith(f"{key}:")]
        assert len(matching) == 1, problems  # one problem per key, not also "must not be empty"
        assert var in matching[0]


def problems_of_file(path: Path, env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    return info.value.problems


def test_sandbox_config_loads_with_no_environment() -> None:
    cfg = load_config(SANDBOX_YAML, env={})
    assert sorted(cfg.countries) == sorted(EMEA + APAC)
    assert cfg.listen.port == 8080
    de = cfg.countries["de"]
    assert de.upstream_base == "http://127.0.0.1:9000/de"
    assert de.upstream_host == "127.0.0.1:9000"
    assert de.insecure is True
    assert de.credentials.client_id == "sandbox-client"
    assert [str(u) for u in cfg.countries["au"].region.token_urls] == [
        "http://127.0.0.1:9000/idp/oauth2/token/",
        "http://127.0.0.1:9000/apac/oauth2/token/",
    ]
    # plain http everywhere: every country and token URL is warned about
    assert any(w.startswith("countries.de.restapi_url:") for w in cfg.warnings)
    assert any(w.startswith("regions.emea.token_urls[0]:") for w in cfg.warnings)


def test_sandbox_config_takes_ports_from_environment() -> None:
    cfg = load_config(SANDBOX_YAML, env={"PROXY_PORT": "8181", "SANDBOX_PORT": "9100"})
    assert cfg.listen.port == 8181
    assert cfg.countries["ca"].upstream_base == "http://127.0.0.1:9100/ca"
    assert str(cfg.regions["emea"].token_urls[1]) == "http://127.0.0.1:9100/emea/oauth2/token/"


def test_load_config_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert str(missing) in problems_of_file(missing, {})[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [unclosed\n", encoding="utf-8")
    problems = problems_of_file(bad, {})
    assert str(bad) in problems[0] and "YAML" in problems[0]


def test_load_config_non_mapping_document(tmp_path: Path) -> None:
    for text in ("- a\n- b\n", "", "just a string\n"):
        f = tmp_path / "doc.yaml"
        f.write_text(text, encoding="utf-8")
        assert problems_of_file(f, {})[0].startswith("(top level):")


def test_norway_country_code_no_is_not_read_as_a_boolean(tmp_path: Path) -> None:
    """YAML 1.1 reads an unquoted ``no:`` key as ``False``; NO (Norway) must still be addable."""
    f = tmp_path / "no.yaml"
    f.write_text(
        "credentials: {default: {client_id: a, client_secret: b, environment_id: c}}\n"
        "regions: {emea: {token_urls: ['https://idp.example/t/']}}\n"
        "countries:\n"
        "  no: {region: emea, restapi_url: 'https://no-restapi-mt-01.api.incountry.io'}\n",
        encoding="utf-8",
    )
    cfg = load_config(f, env={})
    assert list(cfg.countries) == ["no"]


# --- ${VAR} expansion -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "env", "expected"),
    [
        ("${CID}", {"CID": "abc"}, "abc"),
        ("pre-${CID}-post", {"CID": "abc"}, "pre-abc-post"),
        ("${A}${B}", {"A": "x", "B": "y"}, "xy"),
        ("${CID:-fallback}", {}, "fallback"),
        ("${CID:-fallback}", {"CID": "set"}, "set"),
        ("${CID:-http://h:1/p}", {}, "http://h:1/p"),
        ("$CID", {"CID": "abc"}, "$CID"),  # only the braced form is expanded
        ("plain", {"CID": "abc"}, "plain"),
    ],
)
def test_env_expansion(raw: str, env: dict[str, str], expected: str) -> None:
    doc = base_doc()
    doc["credentials"]["default"]["client_id"] = raw
    cfg = parse_config(doc, env=env)
    assert cfg.credentials["default"].client_id == expected


def test_env_default_applies_when_variable_is_set_but_empty() -> None:
    """``${VAR:-default}`` means "unset *or empty*" (POSIX shell, docker compose)."""
    doc = base_doc()
    doc["credentials"]["default"]["client_id"] = "${CID:-fallback}"
    cfg = parse_config(doc, env={"CID": ""})
    assert cfg.credentials["default"].client_id == "fallback"


def test_env_expansion_inside_lists_and_numbers() -> None:
    doc = base_doc()
    doc["regions"]["emea"]["token_urls"] = ["https://${IDP_HOST}/t/", "https://fallback/t/"]
    doc["listen"]["port"] = "${PORT}"
    cfg = parse_config(doc, env={"IDP_HOST": "idp.local", "PORT": "9999"})
    assert str(cfg.regions["emea"].token_urls[0]) == "https://idp.local/t/"
    assert cfg.listen.port == 9999


def test_env_expansion_uses_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_TEST_CID", "from-os-environ")
    doc = base_doc()
    doc["credentials"]["default"]["client_id"] = "${PROXY_TEST_CID}"
    assert parse_config(doc).credentials["default"].client_id == "from-os-environ"


@pytest.mark.parametrize(
    ("mutate", "key", "var"),
    [
        (
            lambda d: d["credentials"]["default"].__setitem__("client_secret", "${NO_SUCH_SECRET}"),
            "credentials.default.client_secret",
            "NO_SUCH_SECRET",
        ),
        (
            lambda d: d["regions"]["emea"].__setitem__("token_urls", ["https://${NO_IDP}/t/"]),
            "regions.emea.token_urls[0]",
            "NO_IDP",
        ),
        (
            lambda d: d["countries"]["de"].__setitem__("restapi_url", "https://${NO_HOST}"),
            "countries.de.restapi_url",
            "NO_HOST",
        ),
        (lambda d: d["listen"].__setitem__("port", "${NO_PORT}"), "listen.port", "NO_PORT"),
    ],
)
def test_missing_env_variable_names_key_and_variable(
    mutate: Callable[[dict[str, Any]], None], key: str, var: str
) -> None:
    doc = base_doc()
    mutate(doc)
    problems = problems_of(doc)
    assert any(p.startswith(f"{key}:") and var in p and "not set" in p for p in problems), problems


def test_env_value_of_wrong_type_is_named() -> None:
    doc = base_doc()
    doc["listen"]["port"] = "${PORT}"
    problems = problems_of(doc, {"PORT": "eighty"})
    assert any(p.startswith("listen.port:") and "eighty" in p for p in problems)


# --- countries and URLs -----------------------------------------------------------------


def test_country_codes_are_case_insensitive() -> None:
    doc = base_doc()
    doc["countries"] = {"DE": doc["countries"]["de"]}
    cfg = parse_config(doc, env={})
    assert list(cfg.countries) == ["de"]
    assert cfg.countries["de"].code == "de"


@pytest.mark.parametrize("codes", [("DE", "de"), ("de", "De"), ("de", " de")])
def test_duplicate_country_in_different_case_is_refused(codes: tuple[str, str]) -> None:
    doc = base_doc()
    entry = doc["countries"]["de"]
    doc["countries"] = {codes[0]: entry, codes[1]: dict(entry)}
    problems = problems_of(doc)
    assert any(p.startswith(f"countries.{codes[1]}:") and "twice" in p for p in problems)


@pytest.mark.parametrize(
    ("restapi", "base", "host"),
    [
        (
            "https://de-restapi-mt-01.api.incountry.io/",
            "https://de-restapi-mt-01.api.incountry.io",
            "de-restapi-mt-01.api.incountry.io",
        ),
        ("https://gw.example:8443/base/path/", "https://gw.example:8443/base/path", "gw.example:8443"),
        ("https://gw.example/base//", "https://gw.example/base", "gw.example"),
        ("https://gw.example/a%2Fb/", "https://gw.example/a%2Fb", "gw.example"),
        ("http://127.0.0.1:9000/de", "http://127.0.0.1:9000/de", "127.0.0.1:9000"),
        ("https://[::1]:8443/p", "https://[::1]:8443/p", "[::1]:8443"),
    ],
)
def test_restapi_url_base_path_kept_and_trailing_slash_stripped(restapi: str, base: str, host: str) -> None:
    doc = base_doc()
    doc["countries"]["de"]["restapi_url"] = restapi
    c = parse_config(doc, env={}).countries["de"]
    assert c.upstream_base == base
    assert str(c.restapi_url) == base
    assert c.upstream_host == host
    assert c.audience == f"{base} {storage_url_for(base)}"


def test_storage_url_drops_restapi_and_keeps_base_path() -> None:
    doc = base_doc()
    doc["countries"]["de"]["restapi_url"] = "https://de-restapi-mt-01.example/base/"
    c = parse_config(doc, env={}).countries["de"]
    assert str(c.storage_url) == "https://de-mt-01.example/base"
    assert c.audience == "https://de-restapi-mt-01.example/base https://de-mt-01.example/base"


def test_explicit_storage_url_is_used_for_audience() -> None:
    doc = base_doc()
    doc["countries"]["de"]["storage_url"] = "https://storage.example/s/"
    c = parse_config(doc, env={}).countries["de"]
    assert str(c.storage_url) == "https://storage.example/s"
    assert c.audience == "https://de-restapi-mt-01.api.incountry.io https://storage.example/s"
    assert c.upstream_base == "https://de-restapi-mt-01.api.incountry.io"


def test_country_may_name_another_credential_set() -> None:
    doc = base_doc()
    doc["countries"]["au"] = {
        "region": "emea",
        "restapi_url": "https://au-restapi-mt-01.api.incountry.io",
        "credentials": "other",
    }
    cfg = parse_config(doc, env={})
    assert cfg.countries["au"].credentials.name == "other"
    assert cfg.countries["de"].credentials.name == "default"


def test_http_upstream_warns_and_https_does_not() -> None:
    doc = base_doc()
    assert parse_config(doc, env={}).warnings == ()
    doc["countries"]["de"]["restapi_url"] = "http://127.0.0.1:9000/de"
    doc["regions"]["emea"]["token_urls"] = ["https://idp.example/t/", "http://127.0.0.1:9000/t/"]
    cfg = parse_config(doc, env={})
    assert cfg.countries["de"].insecure is True
    assert len(cfg.warnings) == 2
    assert any(w.startswith("countries.de.restapi_url:") for w in cfg.warnings)
    assert any(w.startswith("regions.emea.token_urls[1]:") for w in cfg.warnings)


def test_routing_and_forwarded_settings() -> None:
    doc = base_doc()
    doc["routing"] = {"country_header": "X-Country", "path_prefix": False}
    doc["forwarded"] = {"trusted_proxies": ["10.0.0.0/8", "::1", "192.168.1.7"]}
    cfg = parse_config(doc, env={})
    assert cfg.routing.country_header == "X-Country"
    assert cfg.routing.path_prefix is False
    assert cfg.forwarded.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.168.1.7/32"),
    )


@pytest.mark.parametrize("off", [None, False])
def test_country_header_can_be_disabled(off: object) -> None:
    doc = base_doc()
    doc["routing"] = {"country_header": off}
    cfg = parse_config(doc, env={})
    assert cfg.routing.country_header is None
    assert cfg.routing.path_prefix is True


# --- invalid input: every problem names its key -----------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets ``a.b.c`` in the document (creating mappings on the way)."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return mutate


def _del(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[p]
        del node[last]

    return mutate


INVALID: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("unknown top-level key", _set("lisen", {}), "(top level).lisen:"),
    ("unknown listen key", _set("listen.hots", "x"), "listen.hots:"),
    ("unknown country key", _set("countries.de.restapi", "https://x"), "countries.de.restapi:"),
    ("unknown credential key", _set("credentials.default.secret", "x"), "credentials.default.secret:"),
    ("unknown region", _set("countries.de.region", "mars"), "countries.de.region:"),
    ("missing region", _del("countries.de.region"), "countries.de.region:"),
    ("unknown credential set", _set("countries.de.credentials", "nobody"), "countries.de.credentials:"),
    (
        "missing client_secret",
        _del("credentials.default.client_secret"),
        "credentials.default.client_secret:",
    ),
    ("empty client_id", _set("credentials.default.client_id", "  "), "credentials.default.client_id:"),
    (
        "client_id not a string",
        _set("credentials.default.client_id", ["a"]),
        "credentials.default.client_id:",
    ),
    ("no credentials", _set("credentials", {}), "credentials:"),
    ("no regions", _set("regions", {}), "regions:"),
    ("no countries", _set("countries", {}), "countries:"),
    (
        "three-letter country",
        _set("countries.deu", {"region": "emea", "restapi_url": "https://x"}),
        "countries.deu:",
    ),
    (
        "digit in country",
        _set("countries.d1", {"region": "emea", "restapi_url": "https://x"}),
        "countries.d1:",
    ),
    ("missing restapi_url", _del("countries.de.restapi_url"), "countries.de.restapi_url:"),
    ("restapi_url not a URL", _set("countries.de.restapi_url", "not a url"), "countries.de.restapi_url:"),
    ("restapi_url relative", _set("countries.de.restapi_url", "/de"), "countries.de.restapi_url:"),
    ("restapi_url ftp", _set("countries.de.restapi_url", "ftp://de.example"), "countries.de.restapi_url:"),
    ("restapi_url number", _set("countries.de.restapi_url", 42), "countries.de.restapi_url:"),
    (
        "restapi_url bad port",
        _set("countries.de.restapi_url", "https://h:99999/"),
        "countries.de.restapi_url:",
    ),
    (
        "restapi_url credentials",
        _set("countries.de.restapi_url", "https://u:pw@de.example"),
        "countries.de.restapi_url:",
    ),
    (
        "restapi_url user only",
        _set("countries.de.restapi_url", "https://u@de.example"),
        "countries.de.restapi_url:",
    ),
    (
        "restapi_url query",
        _set("countries.de.restapi_url", "https://de.example/?a=1"),
        "countries.de.restapi_url:",
    ),
    (
        "restapi_url fragment",
        _set("countries.de.restapi_url", "https://de.example/#f"),
        "countries.de.restapi_url:",
    ),
    (
        "storage_url query",
        _set("countries.de.storage_url", "https://s.example/?a=1"),
        "countries.de.storage_url:",
    ),
    ("storage_url not a URL", _set("countries.de.storage_url", "nope"), "countries.de.storage_url:"),
    ("empty token_urls", _set("regions.emea.token_urls", []), "regions.emea.token_urls:"),
    ("missing token_urls", _del("regions.emea.token_urls"), "regions.emea.token_urls:"),
    ("token_urls not a list", _set("regions.emea.token_urls", "https://idp/"), "regions.emea.token_urls:"),
    (
        "bad token url",
        _set("regions.emea.token_urls", ["https://ok/t/", "idp"]),
        "regions.emea.token_urls[1]:",
    ),
    (
        "token url with credentials",
        _set("regions.emea.token_urls", ["https://a:b@idp/t/"]),
        "regions.emea.token_urls[0]:",
    ),
    ("port too large", _set("listen.port", 70000), "listen.port:"),
    ("negative port", _set("listen.port", -1), "listen.port:"),
    ("port not a number", _set("listen.port", "http"), "listen.port:"),
    ("port float", _set("listen.port", 80.5), "listen.port:"),
    ("port bool", _set("listen.port", True), "listen.port:"),
    ("header with space", _set("routing.country_header", "X Country"), "routing.country_header:"),
    ("header with colon", _set("routing.country_header", "X-Country:"), "routing.country_header:"),
    ("empty header", _set("routing.country_header", ""), "routing.country_header:"),
    ("header true", _set("routing.country_header", True), "routing.country_header:"),
    ("path_prefix not bool", _set("routing.path_prefix", "yes"), "routing.path_prefix:"),
    ("both routing modes off", _set("routing", {"country_header": None, "path_prefix": False}), "routing:"),
    ("unknown routing key", _set("routing.prefix", True), "routing.prefix:"),
    (
        "bad trusted proxy",
        _set("forwarded.trusted_proxies", ["10.0.0.1", "proxy.local"]),
        "forwarded.trusted_proxies[1]:",
    ),
    ("bad trusted cidr", _set("forwarded.trusted_proxies", ["10.0.0.0/33"]), "forwarded.trusted_proxies[0]:"),
    (
        "trusted proxies not a list",
        _set("forwarded.trusted_proxies", "10.0.0.1"),
        "forwarded.trusted_proxies:",
    ),
    ("refresh ratio too high", _set("tokens.refresh_ratio", 0.99), "tokens.refresh_ratio:"),
    ("refresh ratio too low", _set("tokens.refresh_ratio", 0.01), "tokens.refresh_ratio:"),
    ("negative body limit", _set("limits.max_body_size", -5), "limits.max_body_size:"),
    ("unknown upstream key", _set("upstream.timeout", 5), "upstream.timeout:"),
    ("listen not a mapping", _set("listen", "0.0.0.0:80"), "listen:"),
    ("countries not a mapping", _set("countries", ["de"]), "countries:"),
    ("country not a mapping", _set("countries.de", "https://de.example"), "countries.de:"),
    ("credential set not a mapping", _set("credentials.default", "cid:secret"), "credentials.default:"),
    ("region not a mapping", _set("regions.emea", ["https://idp/"]), "regions.emea:"),
    ("routing not a mapping", _set("routing", ["header"]), "routing:"),
    ("tokens not a mapping", _set("tokens", 5), "tokens:"),
    ("forwarded not a mapping", _set("forwarded", "10.0.0.1"), "forwarded:"),
]


@pytest.mark.parametrize(
    ("mutate", "key"), [(m, k) for _, m, k in INVALID], ids=[name for name, _, _ in INVALID]
)
def test_invalid_input_names_the_key(mutate: Callable[[dict[str, Any]], None], key: str) -> None:
    doc = base_doc()
    mutate(doc)
    problems = problems_of(doc)
    assert any(p.startswith(key) for p in problems), problems


@pytest.mark.parametrize("doc", [None, [], "listen: x", 42])
def test_non_mapping_document_is_refused(doc: Any) -> None:
    assert problems_of(doc)[0].startswith("(top level):")


def test_all_problems_are_reported_together() -> None:
    doc = base_doc()
    by_name = {name: mutate for name, mutate, _ in INVALID}
    for name in (
        "unknown top-level key",
        "unknown region",
        "empty token_urls",
        "port too large",
        "header with space",
        "bad trusted proxy",
    ):
        by_name[name](doc)
    problems = problems_of(doc)
    for key in (
        "(top level).lisen:",
        "countries.de.region:",
        "regions.emea.token_urls:",
        "listen.port:",
        "routing.country_header:",
        "forwarded.trusted_proxies[1]:",
    ):
        assert any(p.startswith(key) for p in problems), (key, problems)


def test_problems_never_echo_a_password_embedded_in_a_url() -> None:
    """Messages never carry a secret, even when a URL is refused for another reason."""
    urls = ["ftp://user:hunter2-pw@de.example/", "https//user:hunter2-pw@de.example"]
    for i, url in enumerate(urls):
        doc = base_doc()
        doc["countries"]["de"]["restapi_url"] = url
        problems = problems_of(doc)
        assert any(p.startswith("countries.de.restapi_url:") for p in problems)
        echoed = sum("hunter2-pw" in p for p in problems)
        assert echoed == 0, f"urls[{i}]: the URL's password appears in {echoed} problem(s)"


# --- secrets never printed --------------------------------------------------------------


def test_secret_masks_itself() -> None:
    s = Secret(SECRET)
    assert s.reveal() == SECRET
    for text in (str(s), repr(s), f"{s}", f"{s!r}", f"{s:}", "%s" % (s,), "%r" % (s,)):  # noqa: UP031
        assert SECRET not in text
        assert "*" in text
    assert Secret("a") == Secret("a") and Secret("a") != Secret("b")


def test_credentials_and_config_never_show_the_secret() -> None:
    creds = Credentials(name="default", client_id="cid", client_secret=Secret(SECRET), environment_id="env")
    cfg = parse_config(base_doc(), env={})
    assert SECRET in cfg.secrets() and "other-secret" in cfg.secrets()
    for obj in (creds, cfg, cfg.credentials, cfg.countries["de"]):
        for text in (str(obj), repr(obj), f"{obj}", f"{obj!r}"):
            assert "cid" in text or "de" in text  # the object really was rendered
            for secret in cfg.secrets():
                assert secret not in text


def test_config_error_never_shows_a_secret() -> None:
    doc = base_doc()
    doc["countries"]["de"]["region"] = "mars"
    with pytest.raises(ConfigError) as info:
        parse_config(doc, env={})
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)


def test_routing_table_rows_contain_no_secret() -> None:
    doc = base_doc()
    doc["countries"]["au"] = {
        "region": "emea",
        "restapi_url": "https://au-restapi.example/",
        "credentials": "other",
    }
    cfg = parse_config(doc, env={})
    rows = routing_table(cfg)
    assert [r["country"] for r in rows] == ["AU", "DE"]
    assert rows[1] == {
        "country": "DE",
        "region": "emea",
        "token_urls": "https://idp.example/oauth2/token/",
        "restapi_url": "https://de-restapi-mt-01.api.incountry.io",
        "storage_url": "https://de-mt-01.api.incountry.io",
        "credentials": "default",
        "client_id": "cid",
    }
    dumped = json.dumps(rows)
    for secret in cfg.secrets():
        assert secret not in dumped


# --- the check-config command -----------------------------------------------------------


@pytest.fixture
def prod_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


@pytest.mark.usefixtures("prod_env")
def test_check_config_prints_routing_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(INCOUNTRY_YAML)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for cc in EMEA + APAC:
        assert f"{cc.upper()} " in out
        assert f"https://{cc}-restapi-mt-01.api.incountry.io" in out
        assert f"https://{cc}-mt-01.api.incountry.io" in out
    for url in (
        IDP,
        "https://auth-emea.incountry.com/oauth2/token/",
        "https://auth-apac.incountry.com/oauth2/token/",
    ):
        assert url in out
    assert "client-id-123" in out
    assert "X-InCountry-Country" in out
    assert SECRET not in out


@pytest.mark.usefixtures("prod_env")
def test_check_config_json_parses(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(INCOUNTRY_YAML), "--json"]) == 0
    out, _ = capsys.readouterr()
    assert SECRET not in out
    data = json.loads(out)
    assert data["warnings"] == []
    assert sorted(r["country"] for r in data["countries"]) == sorted(c.upper() for c in EMEA + APAC)
    de = next(r for r in data["countries"] if r["country"] == "DE")
    assert de["storage_url"] == "https://de-mt-01.api.incountry.io"
    assert de["token_urls"].split() == [IDP, "https://auth-emea.incountry.com/oauth2/token/"]


def test_check_config_json_includes_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(SANDBOX_YAML), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert any(w.startswith("countries.de.restapi_url:") for w in data["warnings"])


def test_check_config_broken_file_exits_2_and_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "credentials: {default: {client_id: a, client_secret: " + SECRET + ", environment_id: c}}\n"
        "regions: {emea: {token_urls: []}}\n"
        "countries: {de: {region: mars, restapi_url: 'https://de.example'}}\n",
        encoding="utf-8",
    )
    assert main(["check-config", "--config", str(broken)]) == EXIT_CONFIG == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert str(broken) in err
    assert "regions.emea.token_urls" in err
    assert "countries.de.region" in err
    assert SECRET not in err


def test_check_config_missing_env_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for k in ENV:
        monkeypatch.delenv(k, raising=False)
    assert main(["check-config", "--config", str(INCOUNTRY_YAML)]) == 2
    err = capsys.readouterr().err
    assert "credentials.default.client_secret" in err and "INCOUNTRY_CLIENT_SECRET" in err


def test_base_doc_is_valid() -> None:
    """The tables above break a document that is otherwise valid."""
    doc = base_doc()
    cfg = parse_config(copy.deepcopy(doc), env={})
    assert list(cfg.countries) == ["de"]


# --- quotas, timeouts and server settings (per country overrides) ---------------------------


def _doc_with(**extra: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "credentials": {"default": {"client_id": "c", "client_secret": "s", "environment_id": "e"}},
        "regions": {"emea": {"token_urls": ["https://idp.example/oauth2/token/"]}},
        "countries": {
            "de": {"region": "emea", "restapi_url": "https://de-restapi-mt-01.api.incountry.io"},
            "us": {
                "region": "emea",
                "restapi_url": "https://us-restapi-mt-01.api.incountry.io",
                "quota": {"max_connections": 5, "queue_timeout": 1},
                "upstream": {"first_byte_timeout": 3},
            },
        },
    }
    doc.update(extra)
    return doc


def test_quota_and_timeouts_default_to_incountry_limits() -> None:
    config = parse_config(_doc_with(), env={})
    de = config.countries["de"]
    assert de.quota.max_connections == 25
    assert de.quota.rate == 250 and de.quota.burst == 125
    assert de.timeouts.first_byte == 30 and de.timeouts.read == 60 and de.timeouts.connect == 10
    assert config.server.shutdown_grace == 30
    assert config.upstream.replay_buffer_size == 1024 * 1024


def test_country_overrides_inherit_the_global_section() -> None:
    config = parse_config(
        _doc_with(quota={"rate": 100}, upstream={"read_timeout": 7}, server={"shutdown_grace": 5}), env={}
    )
    us = config.countries["us"]
    assert us.quota.max_connections == 5 and us.quota.queue_timeout == 1
    assert us.quota.rate == 100  # inherited from the global quota
    assert us.timeouts.first_byte == 3 and us.timeouts.read == 7
    assert config.countries["de"].quota.max_connections == 25
    assert config.server.shutdown_grace == 5


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"quota": {"max_connections": 0}}, "quota.max_connections"),
        ({"quota": {"speed": 1}}, "quota.speed"),
        ({"upstream": {"first_byte_timeout": "soon"}}, "upstream.first_byte_timeout"),
        ({"server": {"grace": 1}}, "server.grace"),
    ],
)
def test_quota_and_timeout_errors_name_the_key(extra: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_doc_with(**extra), env={})
    assert any(p.startswith(key) for p in err.value.problems), err.value.problems


def test_per_country_quota_errors_name_the_country() -> None:
    doc = _doc_with()
    doc["countries"]["us"]["quota"] = {"burst": -1}  # type: ignore[index]
    with pytest.raises(ConfigError) as err:
        parse_config(doc, env={})
    assert any(p.startswith("countries.us.quota.burst") for p in err.value.problems)


def test_a_host_naming_another_country_is_warned_about() -> None:
    doc = _doc_with()
    doc["countries"]["us"]["restapi_url"] = "https://de-restapi-mt-01.api.incountry.io"  # type: ignore[index]
    config = parse_config(doc, env={})
    joined = "\n".join(config.warnings)
    assert "countries.us.restapi_url: the host names country DE, not US" in joined
    assert "the same upstream as countries.de" in joined


def test_the_shipped_production_config_has_no_routing_warnings() -> None:
    env = {"INCOUNTRY_CLIENT_ID": "i", "INCOUNTRY_CLIENT_SECRET": "s", "INCOUNTRY_ENVIRONMENT_ID": "e"}
    config = load_config(INCOUNTRY_YAML, env=env)
    assert config.warnings == ()
