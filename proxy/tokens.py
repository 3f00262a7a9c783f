"""OAuth2 client-credentials tokens: fetch, cache, refresh ahead of expiry, share.

Three layers, so that a shared store (several workers, Redis across replicas) can
replace the cache without touching the rest:

- :func:`token_schedule`: pure arithmetic on when a token is refreshed and when it
  stops being injected.
- :class:`TokenFetcher`: the I/O of one token request, per InCountry's auth rules,
  with failover across the region's token URLs.
- :class:`TokenProvider` (the interface the forwarder uses) and
  :class:`LocalTokenProvider` (an in-process cache with single-flight fetches).

Time comes from an injected monotonic clock. A token is never logged, and
:class:`Token`'s ``repr`` hides its value.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import aiohttp
from cachetools import TLRUCache

from proxy import __version__
from proxy.config import Country, Secret, TokenSettings
from proxy.errors import TokenUnavailableError
from proxy.logs import get_logger
from proxy.streams import BodyTooLong, read_bounded

log = get_logger("proxy.tokens")

Clock = Callable[[], float]

# Token responses are small JSON documents; anything larger is not one.
MAX_TOKEN_RESPONSE = 64 * 1024
# Backoff after a failed fetch: first wait, growth factor and cap (seconds).
BACKOFF_BASE = 1.0
BACKOFF_CAP = 30.0


@dataclass(frozen=True, slots=True)
class TokenKey:
    """What a token is valid for: one per (token URLs, client, scope, audience)."""

    token_urls: tuple[str, ...]
    client_id: str
    scope: str
    audience: str

    @classmethod
    def for_country(cls, country: Country) -> TokenKey:
        return cls(
            token_urls=tuple(str(u) for u in country.region.token_urls),
            client_id=country.credentials.client_id,
            scope=country.credentials.environment_id,
            audience=country.audience,
        )


@dataclass(frozen=True, slots=True, repr=False)
class Token:
    """An access token and its schedule (clock times, from the injected clock)."""

    value: Secret
    obtained_at: float
    refresh_at: float
    usable_until: float
    expires_at: float
    source_url: str

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value to inject."""
        return "Bearer " + self.value.reveal()

    def usable(self, now: float) -> bool:
        return now < self.usable_until

    def __repr__(self) -> str:
        return f"Token(expires_at={self.expires_at:.3f}, source_url={self.source_url!r})"


def token_schedule(sent_at: float, expires_in: float, settings: TokenSettings) -> tuple[float, float, float]:
    """``(refresh_at, usable_until, expires_at)`` for a token requested at ``sent_at``.

    Lifetimes count from when the request was *sent*, so network latency only makes
    the proxy more conservative. A token stops being injected ``margin`` seconds
    before expiry (``expiry_margin``, at most 10% of its life), leaving time for the
    request that carries it to arrive; a refresh starts at ``refresh_ratio`` of life,
    well before that, so requests in steady state never wait for one.
    """
    expires_at = sent_at + expires_in
    margin = min(settings.expiry_margin, expires_in * 0.1)
    usable_until = expires_at - margin
    refresh_at = min(sent_at + expires_in * settings.refresh_ratio, usable_until)
    return refresh_at, usable_until, expires_at


class TokenFetchError(Exception):
    """A token could not be fetched; the message is safe to log and show (no secrets)."""

    def __init__(self, message: str, *, rejected: bool = False, retry_at: float | None = None) -> None:
        super().__init__(message)
        self.rejected = rejected
        #: Do not try again before this clock time (a known expiry), whatever the backoff.
        self.retry_at = retry_at


def parse_token_response(body: bytes, sent_at: float, url: str, settings: TokenSettings) -> Token:
    """Validate a 200 answer from a token URL. Raises :class:`TokenFetchError`.

    The body's content is never quoted in the error: it may hold a token.
    """
    try:
        doc: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise TokenFetchError(f"{url}: 200 response is not JSON ({len(body)} bytes)") from None
    if not isinstance(doc, dict):
        raise TokenFetchError(f"{url}: 200 response is not a JSON object")
    access_token = doc.get("access_token")
    if not isinstance(access_token, str) or not access_token.strip():
        raise TokenFetchError(f"{url}: 200 response has no access_token")
    token_type = doc.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenFetchError(f"{url}: token_type is not bearer")
    expires_in = doc.get("expires_in")
    if (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, (int, float))
        or not (math.isfinite(expires_in) and expires_in >= 1)
    ):
        raise TokenFetchError(f"{url}: expires_in is missing or below 1 second")
    refresh_at, usable_until, expires_at = token_schedule(sent_at, float(expires_in), settings)
    return Token(
        value=Secret(access_token),
        obtained_at=sent_at,
        refresh_at=refresh_at,
        usable_until=usable_until,
        expires_at=expires_at,
        source_url=url,
    )


def _oauth_error(body: bytes) -> str:
    """The RFC 6749 ``error`` code of an error body (a short code, never a secret)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "no RFC 6749 error body"
    code = doc.get("error") if isinstance(doc, dict) else None
    return code if isinstance(code, str) and code.isascii() and len(code) < 64 else "unknown error"


class TokenFetcher:
    """Performs token requests exactly as InCountry's auth server requires.

    ``POST {token_url}`` with HTTP Basic ``client_id:client_secret``, the form fields
    ``grant_type=client_credentials``, ``audience="{restapi_url} {storage_url}"`` and
    ``scope={environment_id}``, and a ``User-Agent`` (mandatory). Token URLs are tried
    in order; connection errors, timeouts, 5xx, 404, 429 and malformed 200 answers move
    on to the next URL. A 400/401/403 stops: the next server would refuse the same
    credentials.
    """

    def __init__(self, session: aiohttp.ClientSession, settings: TokenSettings, clock: Clock) -> None:
        self._session = session
        self._settings = settings
        self._clock = clock
        self._headers = {
            "User-Agent": f"{settings.user_agent}/{__version__}",
            "Accept": "application/json",
        }

    async def fetch(self, country: Country) -> Token:
        creds = country.credentials
        headers = {
            **self._headers,
            "Authorization": aiohttp.encode_basic_auth(creds.client_id, creds.client_secret.reveal()),
        }
        form = {
            "grant_type": "client_credentials",
            "audience": country.audience,
            "scope": creds.environment_id,
        }
        timeout = aiohttp.ClientTimeout(total=self._settings.request_timeout)
        failures: list[str] = []
        for token_url in country.region.token_urls:
            url = str(token_url)
            sent_at = self._clock()
            try:
                async with self._session.post(
                    token_url,
                    data=form,
                    headers=headers,
                    timeout=timeout,
                    allow_redirects=False,
                ) as resp:
                    try:
                        body = await read_bounded(resp.content, MAX_TOKEN_RESPONSE)
                    except BodyTooLong:
                        raise TokenFetchError(
                            f"{url}: answer larger than {MAX_TOKEN_RESPONSE} bytes"
                        ) from None
                    if resp.status == 200:
                        return parse_token_response(body, sent_at, url, self._settings)
                    if resp.status in (400, 401, 403):
                        raise TokenFetchError(
                            f"{url}: auth server refused the token request "
                            f"(HTTP {resp.status} {_oauth_error(body)}); check the credentials, "
                            "environment_id and country configuration",
                            rejected=True,
                        )
                    failures.append(f"{url}: HTTP {resp.status}")
            except TokenFetchError as e:
                if e.rejected:
                    raise
                failures.append(str(e))
            except TimeoutError:
                failures.append(f"{url}: timed out after {self._settings.request_timeout:g}s")
            except aiohttp.ClientError as e:
                failures.append(f"{url}: {type(e).__name__}: {e}")
            log.warning("token_url_failed", country=country.code, failure=failures[-1])
        raise TokenFetchError("; ".join(failures) or "no token URL configured")


@dataclass(frozen=True, slots=True)
class TokenStatus:
    """What operators see of one cached token (never its value)."""

    countries: tuple[str, ...]
    state: str
    expires_in: float | None
    refresh_in: float | None
    last_error: str | None
    fetches: int
    failures: int
    #: Requests that had to wait for a fetch (only first use, or after an outage, in steady state).
    waits: int


class TokenProvider(Protocol):
    """What the forwarder needs from a token source.

    Implementations promise: ``get`` returns a token that is usable now or raises
    :class:`TokenUnavailableError`; it never returns an expired token.
    """

    async def get(self, country: Country) -> Token: ...

    def invalidate(self, country: Country, rejected: Token) -> bool:
        """Forget ``rejected`` if it is still the cached token (another request may have
        refreshed it already). Returns whether it was dropped."""
        ...

    def status(self) -> list[TokenStatus]: ...

    async def close(self) -> None: ...


@dataclass
class _KeyState:
    countries: set[str] = field(default_factory=set)
    fetches: int = 0
    failures: int = 0
    waits: int = 0
    consecutive_failures: int = 0
    retry_at: float = 0.0
    last_error: str | None = None
    #: The last token fetched, and the last one the REST API rejected.
    last: Token | None = None
    rejected: Secret | None = None


class LocalTokenProvider:
    """In-process token cache: single flight per key, refresh ahead, short negative cache.

    - A cached token is returned while usable; once past its refresh point a background
      refresh starts (one per key) and callers keep the current token meanwhile.
    - Callers that find no usable token share one fetch (single flight); cancelling
      one caller does not cancel the fetch for the others.
    - After a failed fetch, callers without a usable token get 503 at once until a
      backoff (1 s doubling to 30 s, with jitter) has passed, instead of each hitting a
      dead server. A valid token keeps being used while its refresh fails.
    """

    def __init__(
        self,
        fetcher: TokenFetcher,
        settings: TokenSettings,
        clock: Clock,
        maxsize: int = 4096,
        random: Callable[[], float] = random.random,
    ) -> None:
        self._fetcher = fetcher
        self._settings = settings
        self._clock = clock
        self._random = random
        self._cache: TLRUCache[TokenKey, Token] = TLRUCache(
            maxsize=maxsize, ttu=lambda _k, tok, _now: tok.usable_until, timer=clock
        )
        self._inflight: dict[TokenKey, asyncio.Task[Token]] = {}
        self._state: dict[TokenKey, _KeyState] = {}
        self._keys: dict[str, TokenKey] = {}

    def _key(self, country: Country) -> TokenKey:
        key = self._keys.get(country.code)
        if key is None:
            key = self._keys[country.code] = TokenKey.for_country(country)
            self._state.setdefault(key, _KeyState()).countries.add(country.code)
        return key

    async def get(self, country: Country) -> Token:
        key = self._key(country)
        now = self._clock()
        token = self._cache.get(key)
        if token is not None and token.usable(now):
            if now >= token.refresh_at and key not in self._inflight and now >= self._state[key].retry_at:
                self._start_fetch(key, country)
            return token
        state = self._state[key]
        task = self._inflight.get(key)
        if task is None:
            if now < state.retry_at:
                raise TokenUnavailableError(
                    f"no access token for {country.code.upper()}: the last token request failed "
                    f"({state.last_error}); the request was not forwarded",
                    retry_after=max(1, math.ceil(state.retry_at - now)),
                )
            task = self._start_fetch(key, country)
        state.waits += 1
        try:
            token = await asyncio.shield(task)
        except TokenFetchError as e:
            raise TokenUnavailableError(
                f"no access token for {country.code.upper()}: {e}; the request was not forwarded",
                retry_after=max(1, math.ceil(state.retry_at - self._clock())),
            ) from None
        if not token.usable(self._clock()):
            # The answer took longer than the token's life: never inject it.
            raise TokenUnavailableError(
                f"no access token for {country.code.upper()}: the auth server's answer arrived after "
                "the token's usable life had passed; the request was not forwarded",
                retry_after=1,
            )
        return token

    def _start_fetch(self, key: TokenKey, country: Country) -> asyncio.Task[Token]:
        task = asyncio.get_running_loop().create_task(self._fetch(key, country))
        self._inflight[key] = task
        task.add_done_callback(lambda t: self._fetch_done(key, t))
        return task

    def _fetch_done(self, key: TokenKey, task: asyncio.Task[Token]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # consumed here; waiters re-raise it themselves

    async def _fetch(self, key: TokenKey, country: Country) -> Token:
        state = self._state[key]
        state.fetches += 1
        try:
            token = self._check_repeat(state, await self._fetcher.fetch(country))
        except TokenFetchError as e:
            self._failed(state, e)
            raise
        state.consecutive_failures = 0
        state.retry_at = 0.0
        state.last_error = None
        state.last = token
        self._cache[key] = token
        log.info(
            "token_fetched",
            countries=sorted(state.countries),
            source=token.source_url,
            expires_in=round(token.expires_at - token.obtained_at, 3),
        )
        return token

    def _check_repeat(self, state: _KeyState, token: Token) -> Token:
        """Guard against an auth server that hands back a token the proxy already had.

        Its new ``expires_in`` cannot extend its life: the first expiry stands. While
        it is still usable it is kept, with no refresh before it expires (refreshing
        again would only spin); once it is not, the next fetch waits for its expiry.
        A token the REST API rejected is never taken back.
        """
        if token.value == state.rejected:
            raise TokenFetchError(f"{token.source_url}: returned the token the REST API just rejected")
        last = state.last
        if last is None or token.value != last.value:
            return token
        now = self._clock()
        if last.usable(now):
            return replace(last, refresh_at=last.expires_at)
        raise TokenFetchError(
            f"{token.source_url}: returned the same token again, which expires in "
            f"{max(0.0, last.expires_at - now):.1f}s; the next request for a new one is made after that",
            retry_at=last.expires_at,
        )

    def _failed(self, state: _KeyState, error: TokenFetchError) -> None:
        state.failures += 1
        state.consecutive_failures += 1
        state.last_error = str(error)
        # Exponential backoff with "equal jitter": replicas do not retry in lockstep.
        backoff = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (state.consecutive_failures - 1))
        backoff = backoff / 2 + self._random() * backoff / 2
        now = self._clock()
        state.retry_at = max(now + backoff, error.retry_at or 0.0)
        log.error(
            "token_fetch_failed",
            countries=sorted(state.countries),
            error=str(error),
            retry_in=round(state.retry_at - now, 3),
        )

    def invalidate(self, country: Country, rejected: Token) -> bool:
        key = self._key(country)
        state = self._state[key]
        state.rejected = rejected.value
        current = self._cache.get(key)
        if current is not None and current.value == rejected.value:
            del self._cache[key]
            return True
        return False

    def status(self) -> list[TokenStatus]:
        now = self._clock()
        out = []
        for key, st in self._state.items():
            tok = self._cache.get(key)
            if key in self._inflight:
                state = "refreshing" if tok else "fetching"
            elif tok is None:
                state = "failing" if st.last_error else "none"
            else:
                state = "valid"
            out.append(
                TokenStatus(
                    countries=tuple(sorted(st.countries)),
                    state=state,
                    expires_in=round(tok.expires_at - now, 3) if tok else None,
                    refresh_in=round(max(0.0, tok.refresh_at - now), 3) if tok else None,
                    last_error=st.last_error,
                    fetches=st.fetches,
                    failures=st.failures,
                    waits=st.waits,
                )
            )
        return out

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
