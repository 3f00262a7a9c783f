"""A local emulator of InCountry's OAuth2 token endpoint and REST API ("sandbox").

It enforces InCountry's token rules and bearer checks so the proxy can be tested
end to end without the real service. See :func:`build_sandbox_app` and
:func:`run_sandbox`.
"""

from proxy.sandbox.app import SANDBOX_STATE, build_sandbox_app, run_sandbox
from proxy.sandbox.settings import DEFAULT_CLIENT, SandboxClient, SandboxSettings
from proxy.sandbox.state import SandboxState

__all__ = [
    "DEFAULT_CLIENT",
    "SANDBOX_STATE",
    "SandboxClient",
    "SandboxSettings",
    "SandboxState",
    "build_sandbox_app",
    "run_sandbox",
]
