"""The syft patches a Fedsite datasite applies on top of the client's, and the one ``install()`` that applies all.

Each is listed here with its reason; docs/syft.md explains the syft 0.9.5 behaviour behind it. A site
cannot run without them: ``datasites.server`` calls ``install()`` when it builds a site and again when it
registers one (``datasites.guard.register_site``), so no site is served before its guard and gate are in
place, and ``install()`` refuses a syft other than the one they were written for
(``policies.syft_patches.SYFT_VERSION``).
"""

from __future__ import annotations

from policies.syft_patches import CLIENT_PATCHES, Patch
from policies.syft_patches import install as install_patches


def _speedups() -> None:
    from datasites.syft_speedups import install_syft_speedups

    install_syft_speedups()


def _error_relay() -> None:
    from datasites.server_errors import relay_unexpected_server_errors

    relay_unexpected_server_errors()


def _guard() -> None:
    from datasites.guard import install_guard

    install_guard()


def _gate() -> None:
    from datasites.gate import install_gate

    install_gate()


SITE_PATCHES: tuple[Patch, ...] = (
    Patch("syft.service.action.action_service.ActionService._user_code_execute (wrapped)",
          "syft's approval and run limits are not enforced: the execution guard checks the site's own approval "
          "registry before approved code meets private data", _guard),
    Patch("syft.server.server.Server.handle_api_call_with_unsigned_result and Server.get_api (wrapped)",
          "syft opens 114 service paths to a researcher (action.execute among them): the API gate denies every "
          "call not on the site's allowlist, and /api no longer lists researchers' functions to anyone", _gate),
    Patch("syft.types.syft_object.attach_attribute_to_syft_object (and syft.service.service's copy)",
          "syft walks every str and bytes of a result character by character: about half of a secure-sum "
          "stage's time", _speedups),
    Patch("logger 'syft.server.server' (level and a filter)",
          "syft hides an unexpected service error's traceback in a debug record that its own log level drops: "
          "relayed to the fedsite.site logger so the site's admin can diagnose it", _error_relay),
)
PATCHES: tuple[Patch, ...] = (*CLIENT_PATCHES, *SITE_PATCHES)  # every patch Fedsite applies to syft


def install(*, verbose: bool | None = None) -> None:
    """Check the syft version and apply every patch in ``PATCHES`` (idempotent; see policies.syft_patches.install)."""
    install_patches(verbose=verbose, patches=SITE_PATCHES)


__all__ = ["PATCHES", "SITE_PATCHES", "install"]
