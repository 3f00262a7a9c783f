"""The configuration: one frozen object, validated at load.

The YAML shape (``listen``, ``credentials``, ``regions``, ``countries``, ``routing``)
is the public contract; see ``README.md`` for every key. Everything derivable from it
(storage URL, audience, upstream base URL, header sets) is computed here once, not per
request. Every validation problem names its key; all problems are reported together.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from proxy.errors import ConfigError

DEFAULT_COUNTRY_HEADER = "X-InCountry-Country"
# InCountry documents 25 connections per client IP (see docs/ and the product facts).
INCOUNTRY_CONNECTIONS_PER_IP = 25

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_COUNTRY_RE = re.compile(r"^[a-z]{2}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_USERINFO_RE = re.compile(r"^[^/?#]*//[^/?#]*@|^[^/?#:]*:[^/?#]*@")
_HEADER_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class Secret:
    """A string that refuses to be printed: ``str``/``repr`` show a mask, ``reveal`` the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True)
class Credentials:
    """A named OAuth2 client: the ``client_id``/``client_secret`` pair and its environment."""

    name: str
    client_id: str
    client_secret: Secret
    environment_id: str


@dataclass(frozen=True)
class Region:
    """A region only chooses the token URLs, tried in order."""

    name: str
    token_urls: tuple[URL, ...]


@dataclass(frozen=True)
class Timeouts:
    """Per-upstream timeouts, seconds. There is no total timeout: it would cut long streams."""

    connect: float = 10.0
    #: From the request being sent (bodiless or buffered) to the response headers.
    first_byte: float = 30.0
    #: Longest silence while reading a response.
    read: float = 60.0


@dataclass(frozen=True)
class Quota:
    """Admission to one upstream. Defaults follow InCountry's documented limits: 25
    connections per client IP, 10 requests/s per connection with a burst of 5."""

    max_connections: int = INCOUNTRY_CONNECTIONS_PER_IP
    #: Requests per second to this upstream (25 connections x 10 requests/s).
    rate: float = INCOUNTRY_CONNECTIONS_PER_IP * 10.0
    #: Requests allowed at once above the rate (25 connections x burst 5).
    burst: int = INCOUNTRY_CONNECTIONS_PER_IP * 5
    #: Requests that may wait for a connection or the rate; more get 429 at once.
    queue_size: int = 1000
    #: Longest wait in the queue before 429, seconds.
    queue_timeout: float = 10.0


@dataclass(frozen=True)
class Country:
    """One country's upstream and everything derived from it."""

    code: str
    region: Region
    restapi_url: URL
    storage_url: URL
    credentials: Credentials
    #: ``"{restapi_url} {storage_url}"``: the token's audience (one token per country).
    audience: str
    #: The restapi_url as an encoded string without trailing slash; raw request paths are appended.
    upstream_base: str
    #: ``host[:port]`` sent as the upstream ``Host`` header.
    upstream_host: str
    insecure: bool
    timeouts: Timeouts = field(default_factory=Timeouts)
    quota: Quota = field(default_factory=Quota)


@dataclass(frozen=True)
class Routing:
    #: Header naming the country, or None to disable header routing.
    country_header: str | None = DEFAULT_COUNTRY_HEADER
    #: ``/de/api/...`` names DE and the prefix is stripped.
    path_prefix: bool = True


@dataclass(frozen=True)
class TokenSettings:
    #: Timeout of one token request to one token URL, seconds.
    request_timeout: float = 10.0
    #: Refresh once this fraction of the lifetime has passed.
    refresh_ratio: float = 0.75
    #: A token is never injected within this many seconds of its expiry (capped at 10% of life).
    expiry_margin: float = 30.0
    user_agent: str = "incountry-proxy"


@dataclass(frozen=True)
class UpstreamSettings:
    timeouts: Timeouts = field(default_factory=Timeouts)
    #: Pooled connections to all upstreams together (each is capped by its quota too).
    max_connections: int = 200
    keepalive_timeout: float = 15.0
    #: Request bodies up to this size (with a Content-Length) are buffered, so that the
    #: request can be replayed once after a 401. Larger and chunked bodies stream.
    replay_buffer_size: int = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    #: Seconds in-flight requests get to finish after SIGTERM.
    shutdown_grace: float = 30.0


@dataclass(frozen=True)
class Limits:
    #: Largest request body accepted, bytes, enforced while streaming.
    max_body_size: int = 100 * 1024 * 1024


@dataclass(frozen=True)
class Forwarded:
    #: Peers whose ``X-Forwarded-*`` headers are kept and appended to; others are replaced.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class Config:
    listen: Listen
    credentials: Mapping[str, Credentials]
    regions: Mapping[str, Region]
    countries: Mapping[str, Country]
    routing: Routing = field(default_factory=Routing)
    tokens: TokenSettings = field(default_factory=TokenSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    quota: Quota = field(default_factory=Quota)
    server: ServerSettings = field(default_factory=ServerSettings)
    limits: Limits = field(default_factory=Limits)
    forwarded: Forwarded = field(default_factory=Forwarded)
    #: Non-fatal findings (plain-http upstreams) to log at startup.
    warnings: tuple[str, ...] = ()

    def secrets(self) -> list[str]:
        """Every secret value in the config, for output scanning in tests and audits."""
        return [c.client_secret.reveal() for c in self.credentials.values()]


def storage_url_for(restapi_url: str) -> str:
    """InCountry's rule: the storage URL is the REST API URL with ``-restapi`` removed."""
    return restapi_url.replace("-restapi", "")


def expand_env(value: Any, key: str, env: Mapping[str, str], problems: list[str]) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string scalar, recursively."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            value = env.get(name)
            # As in POSIX shells, ":-" applies to unset *and* empty variables.
            if value is not None and (value or default is None):
                return value
            if default is not None:
                return default
            problems.append(f"{key}: environment variable {name} is not set")
            return ""

        return _ENV_RE.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, f"{key}.{k}" if key else str(k), env, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{key}[{i}]", env, problems) for i, v in enumerate(value)]
    return value


class _Reader:
    """Typed accessors over a YAML mapping that record problems instead of raising."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    def mapping(self, value: Any, key: str, allowed: frozenset[str] | None = None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problems.append(f"{key}: must be a mapping, got {type(value).__name__}")
            return {}
        if allowed is not None:
            for k in value:
                if str(k) not in allowed:
                    self.problems.append(f"{key}.{k}: unknown key (allowed: {', '.join(sorted(allowed))})")
        return {str(k): v for k, v in value.items()}

    def string(self, m: Mapping[str, Any], name: str, key: str, default: str | None = None) -> str:
        v = m.get(name, default)
        if v is None:
            self.problems.append(f"{key}.{name}: required")
            return ""
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            self.problems.append(f"{key}.{name}: must be a string")
            return ""
        s = str(v).strip()
        if not s and not any(p.startswith(f"{key}.{name}:") for p in self.problems):
            self.problems.append(f"{key}.{name}: must not be empty")
        return s

    def number(
        self,
        m: Mapping[str, Any],
        name: str,
        key: str,
        default: float,
        *,
        minimum: float = 0.0,
        integer: bool = False,
    ) -> float:
        v = m.get(name, default)
        if isinstance(v, str):  # values from ${VAR} arrive as strings
            try:
                v = int(v) if integer else float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            kind = "an integer" if integer else "a number"
            self.problems.append(f"{key}.{name}: must be {kind}, got {v!r}")
            return default
        if v < minimum:
            self.problems.append(f"{key}.{name}: must be at least {minimum}, got {v}")
            return default
        return float(v)

    def boolean(self, m: Mapping[str, Any], name: str, key: str, default: bool) -> bool:
        v = m.get(name, default)
        if not isinstance(v, bool):
            self.problems.append(f"{key}.{name}: must be true or false, got {v!r}")
            return default
        return v

    def url(self, raw: Any, key: str) -> URL | None:
        if isinstance(raw, str) and _USERINFO_RE.search(raw):
            # Checked first, and never echoed: the URL may carry a password.
            self.problems.append(f"{key}: must not contain credentials (user:password@)")
            return None
        if not isinstance(raw, str) or not raw.strip():
            self.problems.append(f"{key}: must be an absolute http(s) URL string")
            return None
        try:
            u = URL(raw.strip())
        except ValueError as e:
            self.problems.append(f"{key}: not a valid URL ({e})")
            return None
        if u.scheme not in ("http", "https") or not u.host:
            self.problems.append(f"{key}: must be an absolute http(s) URL, got {raw!r}")
            return None
        if u.user or u.password:
            self.problems.append(f"{key}: must not contain credentials")
            return None
        if u.query_string or u.fragment:
            self.problems.append(f"{key}: must not have a query or fragment")
            return None
        return u


_TOP = frozenset(
    {
        "listen",
        "credentials",
        "regions",
        "countries",
        "routing",
        "tokens",
        "upstream",
        "quota",
        "server",
        "limits",
        "forwarded",
    }
)


_TIMEOUT_KEYS = frozenset({"connect_timeout", "first_byte_timeout", "read_timeout"})
_QUOTA_KEYS = frozenset({"max_connections", "rate", "burst", "queue_size", "queue_timeout"})


def _timeouts(r: _Reader, m: Mapping[str, Any], key: str, base: Timeouts) -> Timeouts:
    return Timeouts(
        connect=r.number(m, "connect_timeout", key, base.connect, minimum=0.1),
        first_byte=r.number(m, "first_byte_timeout", key, base.first_byte, minimum=0.1),
        read=r.number(m, "read_timeout", key, base.read, minimum=0.1),
    )


def _quota(r: _Reader, raw: Any, key: str, base: Quota) -> Quota:
    m = r.mapping(raw, key, _QUOTA_KEYS)
    return Quota(
        max_connections=int(
            r.number(m, "max_connections", key, base.max_connections, minimum=1, integer=True)
        ),
        rate=r.number(m, "rate", key, base.rate, minimum=0.1),
        burst=int(r.number(m, "burst", key, base.burst, minimum=1, integer=True)),
        queue_size=int(r.number(m, "queue_size", key, base.queue_size, minimum=0, integer=True)),
        queue_timeout=r.number(m, "queue_timeout", key, base.queue_timeout, minimum=0),
    )


def _upstream(r: _Reader, raw: Any) -> UpstreamSettings:
    d = UpstreamSettings()
    up = r.mapping(
        raw, "upstream", _TIMEOUT_KEYS | {"max_connections", "keepalive_timeout", "replay_buffer_size"}
    )
    return UpstreamSettings(
        timeouts=_timeouts(r, up, "upstream", d.timeouts),
        max_connections=int(
            r.number(up, "max_connections", "upstream", d.max_connections, minimum=1, integer=True)
        ),
        keepalive_timeout=r.number(up, "keepalive_timeout", "upstream", d.keepalive_timeout),
        replay_buffer_size=int(
            r.number(up, "replay_buffer_size", "upstream", d.replay_buffer_size, minimum=0, integer=True)
        ),
    )


_HOST_COUNTRY_RE = re.compile(r"^([a-z]{2})-restapi")


def _routing_warnings(key: str, code: str, restapi: URL, countries: Mapping[str, Country]) -> list[str]:
    """Findings that may mean one country's data would reach another's upstream.

    Warnings, not errors: InCountry serves some countries through another country's
    host, and this configuration is authoritative. But an operator should see them.
    """
    found = []
    named = _HOST_COUNTRY_RE.match(restapi.host or "")
    if named and named.group(1) != code:
        found.append(
            f"{key}.restapi_url: the host names country {named.group(1).upper()}, not {code.upper()}; "
            f"{code.upper()}'s data will go there"
        )
    for other in countries.values():
        if other.upstream_base == str(restapi):
            found.append(
                f"{key}.restapi_url: the same upstream as countries.{other.code}; "
                f"{code.upper()}'s and {other.code.upper()}'s data will go to one place"
            )
    return found


def parse_config(data: Any, env: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed YAML document and build the :class:`Config`.

    Raises :class:`ConfigError` listing every problem, each prefixed with its key.
    """
    problems: list[str] = []
    environ = os.environ if env is None else env
    r = _Reader(problems)
    if not isinstance(data, dict):
        raise ConfigError(["(top level): must be a mapping with listen, credentials, regions, countries"])
    data = expand_env(data, "", environ, problems)
    top = r.mapping(data, "(top level)", _TOP)
    warnings: list[str] = []

    lm = r.mapping(top.get("listen"), "listen", frozenset({"host", "port"}))
    port = r.number(lm, "port", "listen", 8080, integer=True)
    if not 0 <= port <= 65535:
        problems.append(f"listen.port: must be 0..65535, got {int(port)}")
    listen = Listen(host=r.string(lm, "host", "listen", "127.0.0.1"), port=int(port))

    credentials: dict[str, Credentials] = {}
    cm = r.mapping(top.get("credentials"), "credentials")
    if not cm:
        problems.append("credentials: at least one credential set is required (usually 'default')")
    for name, raw in cm.items():
        key = f"credentials.{name}"
        c = r.mapping(raw, key, frozenset({"client_id", "client_secret", "environment_id"}))
        credentials[name] = Credentials(
            name=name,
            client_id=r.string(c, "client_id", key),
            client_secret=Secret(r.string(c, "client_secret", key)),
            environment_id=r.string(c, "environment_id", key),
        )

    regions: dict[str, Region] = {}
    rm = r.mapping(top.get("regions"), "regions")
    if not rm:
        problems.append("regions: at least one region is required")
    for name, raw in rm.items():
        key = f"regions.{name}"
        reg = r.mapping(raw, key, frozenset({"token_urls"}))
        urls_raw = reg.get("token_urls")
        if not isinstance(urls_raw, list) or not urls_raw:
            problems.append(f"{key}.token_urls: must be a non-empty list of URLs")
            urls_raw = []
        urls: list[URL] = []
        for i, u in enumerate(urls_raw):
            parsed = r.url(u, f"{key}.token_urls[{i}]")
            if parsed is not None:
                urls.append(parsed)
                if parsed.scheme == "http":
                    warnings.append(f"{key}.token_urls[{i}]: plain http; client secrets travel unencrypted")
        regions[name] = Region(name=name, token_urls=tuple(urls))

    upstream = _upstream(r, top.get("upstream"))
    quota = _quota(r, top.get("quota"), "quota", Quota())
    sv = r.mapping(top.get("server"), "server", frozenset({"shutdown_grace"}))
    server = ServerSettings(
        shutdown_grace=r.number(sv, "shutdown_grace", "server", ServerSettings.shutdown_grace)
    )

    countries: dict[str, Country] = {}
    com = r.mapping(top.get("countries"), "countries")
    if not com:
        problems.append("countries: at least one country is required")
    for raw_code, raw in com.items():
        code = raw_code.strip().lower()
        key = f"countries.{raw_code}"
        if not _COUNTRY_RE.match(code):
            problems.append(f"{key}: country code must be two letters (ISO 3166-1 alpha-2)")
            continue
        if code in countries:
            problems.append(f"{key}: country {code.upper()} is listed twice (codes are case-insensitive)")
            continue
        cc = r.mapping(
            raw, key, frozenset({"region", "restapi_url", "storage_url", "credentials", "upstream", "quota"})
        )
        country_timeouts = _timeouts(
            r,
            r.mapping(cc.get("upstream"), f"{key}.upstream", _TIMEOUT_KEYS),
            f"{key}.upstream",
            upstream.timeouts,
        )
        country_quota = _quota(r, cc.get("quota"), f"{key}.quota", quota)
        region_name = r.string(cc, "region", key)
        region = regions.get(region_name)
        if region is None and region_name:
            known = ", ".join(sorted(regions)) or "none"
            problems.append(f"{key}.region: unknown region {region_name!r} (known: {known})")
        cred_name = r.string(cc, "credentials", key, "default")
        cred = credentials.get(cred_name)
        if cred is None and cred_name:
            known = ", ".join(sorted(credentials)) or "none"
            problems.append(f"{key}.credentials: unknown credential set {cred_name!r} (known: {known})")
        restapi = r.url(cc.get("restapi_url"), f"{key}.restapi_url")
        storage_raw = cc.get("storage_url")
        storage: URL | None
        if restapi is None:
            continue
        restapi_s = str(restapi).rstrip("/")
        restapi = URL(restapi_s, encoded=True)
        if storage_raw is None:
            storage = URL(storage_url_for(restapi_s), encoded=True)
        else:
            storage = r.url(storage_raw, f"{key}.storage_url")
        if storage is None or region is None or cred is None:
            continue
        storage_s = str(storage).rstrip("/")
        insecure = restapi.scheme == "http"
        if insecure:
            warnings.append(f"{key}.restapi_url: plain http; regulated data and tokens travel unencrypted")
        warnings.extend(_routing_warnings(key, code, restapi, countries))
        countries[code] = Country(
            code=code,
            region=region,
            restapi_url=restapi,
            storage_url=URL(storage_s, encoded=True),
            credentials=cred,
            audience=f"{restapi_s} {storage_s}",
            upstream_base=restapi_s,
            upstream_host=restapi.raw_authority,
            insecure=insecure,
            timeouts=country_timeouts,
            quota=country_quota,
        )

    rt = r.mapping(top.get("routing"), "routing", frozenset({"country_header", "path_prefix"}))
    header: str | None = DEFAULT_COUNTRY_HEADER
    if "country_header" in rt:
        hv = rt["country_header"]
        if hv is None or hv is False:
            header = None
        elif not isinstance(hv, str) or not _HEADER_RE.match(hv):
            problems.append(f"routing.country_header: must be a valid HTTP header name, got {hv!r}")
        else:
            header = hv
    routing = Routing(country_header=header, path_prefix=r.boolean(rt, "path_prefix", "routing", True))
    if routing.country_header is None and not routing.path_prefix:
        problems.append("routing: enable country_header or path_prefix, or no request can be routed")

    d = TokenSettings()
    tk = r.mapping(
        top.get("tokens"),
        "tokens",
        frozenset({"request_timeout", "refresh_ratio", "expiry_margin", "user_agent"}),
    )
    ratio = r.number(tk, "refresh_ratio", "tokens", d.refresh_ratio, minimum=0.1)
    if ratio > 0.95:
        problems.append(f"tokens.refresh_ratio: must be at most 0.95, got {ratio}")
    tokens = TokenSettings(
        request_timeout=r.number(tk, "request_timeout", "tokens", d.request_timeout, minimum=0.1),
        refresh_ratio=ratio,
        expiry_margin=r.number(tk, "expiry_margin", "tokens", d.expiry_margin),
        user_agent=r.string(tk, "user_agent", "tokens", d.user_agent),
    )

    li = r.mapping(top.get("limits"), "limits", frozenset({"max_body_size"}))
    limits = Limits(
        max_body_size=int(
            r.number(li, "max_body_size", "limits", Limits.max_body_size, minimum=0, integer=True)
        )
    )

    fw = r.mapping(top.get("forwarded"), "forwarded", frozenset({"trusted_proxies"}))
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    tp = fw.get("trusted_proxies", [])
    if not isinstance(tp, list):
        problems.append("forwarded.trusted_proxies: must be a list of IP addresses or CIDR networks")
        tp = []
    for i, n in enumerate(tp):
        try:
            nets.append(ipaddress.ip_network(str(n), strict=False))
        except ValueError:
            problems.append(f"forwarded.trusted_proxies[{i}]: not an IP address or network: {n!r}")

    if problems:
        raise ConfigError(problems)
    return Config(
        listen=listen,
        credentials=credentials,
        regions=regions,
        countries=countries,
        routing=routing,
        tokens=tokens,
        upstream=upstream,
        quota=quota,
        server=server,
        limits=limits,
        forwarded=Forwarded(trusted_proxies=tuple(nets)),
        warnings=tuple(warnings),
    )


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false.

    YAML 1.1 reads ``no``, ``on``, ``y``... as booleans, which would turn Norway's
    country code ``no:`` into ``False``.
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{p}: cannot read ({e.strerror})"]) from None
    try:
        data = yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ConfigError([f"{p}: not valid YAML ({e})"]) from None
    return parse_config(data, env)


def routing_table(config: Config) -> list[dict[str, str]]:
    """The routing table as plain rows (no secrets), for ``check-config`` and status pages."""
    return [
        {
            "country": c.code.upper(),
            "region": c.region.name,
            "token_urls": " ".join(str(u) for u in c.region.token_urls),
            "restapi_url": str(c.restapi_url),
            "storage_url": str(c.storage_url),
            "credentials": c.credentials.name,
            "client_id": c.credentials.client_id,
        }
        for c in sorted(config.countries.values(), key=lambda c: c.code)
    ]
