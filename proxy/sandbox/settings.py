"""Configuration of the local InCountry emulator ("sandbox").

Settings are immutable: a test builds one :class:`SandboxSettings`, hands it to
:func:`proxy.sandbox.app.build_sandbox_app` and can rely on it not changing while
the server runs. Mutable run-time data lives in :class:`proxy.sandbox.state.SandboxState`.
"""

from __future__ import annotations

from dataclasses import dataclass

from yarl import URL


@dataclass(frozen=True)
class SandboxClient:
    """One OAuth2 client the sandbox's token endpoint accepts."""

    client_id: str
    client_secret: str
    environment_id: str

    def __repr__(self) -> str:
        # The secret must not end up in logs or test output through a repr.
        return (
            f"SandboxClient(client_id={self.client_id!r}, client_secret='***', "
            f"environment_id={self.environment_id!r})"
        )


DEFAULT_CLIENT = SandboxClient("sandbox-client", "sandbox-secret", "sandbox-env")


@dataclass(frozen=True)
class SandboxSettings:
    """Everything that shapes the sandbox's behaviour, fixed at start-up.

    ``public_url`` is the base URL clients use to reach the sandbox (for example
    when it sits behind a port forward). When it is ``None`` the base URL of each
    request is derived from the request itself (``scheme://Host``). A country's
    ``restapi_url`` is that base URL plus ``/{cc}``, and a token's audience must
    name it exactly.
    """

    host: str = "127.0.0.1"
    port: int = 9000
    expires_in: int = 300
    clients: tuple[SandboxClient, ...] = (DEFAULT_CLIENT,)
    public_url: str | None = None
    max_file_size: int = 20 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.expires_in <= 0:
            raise ValueError("expires_in must be positive")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be within 0..65535")
        if self.max_file_size <= 0:
            raise ValueError("max_file_size must be positive")
        if not self.clients:
            raise ValueError("at least one client is required")
        ids = [c.client_id for c in self.clients]
        if len(set(ids)) != len(ids):
            raise ValueError("client ids must be unique")
        if self.public_url is not None:
            url = URL(self.public_url)
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError("public_url must be an absolute http(s) URL")
            if url.query_string or url.fragment:
                raise ValueError("public_url must not carry a query or fragment")

    def client(self, client_id: str) -> SandboxClient | None:
        """The configured client with this id, or ``None``."""
        for candidate in self.clients:
            if candidate.client_id == client_id:
                return candidate
        return None
