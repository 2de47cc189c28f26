"""A hostile researcher's tools: syft API calls made by hand, signed with the researcher's own key.

Fedsite's helpers never make these calls; an attacker does. Works over an in-process connection and
over HTTP alike (the client's own connection carries the signed call).
"""

from __future__ import annotations

import re
from typing import Any


def raw_call(client: Any, path: str, *args: Any, blocking: bool = True, server_uid: Any = None,
             signer: Any = None, **kwargs: Any) -> Any:
    """Send ``path(*args, **kwargs)`` as one signed API call and return what the site answered (unwrapped)."""
    from syft.client.api import SyftAPICall

    call = SyftAPICall(server_uid=server_uid or client.api.server_uid, path=path, args=list(args), kwargs=kwargs,
                       blocking=blocking)
    reply = client.connection.make_call(call.sign(signer or client.api.signing_key))
    return reply.message.data


def refusal(answer: Any) -> str:
    """The message of a site's refusal; fails the test if the site answered anything else."""
    from syft.service.response import SyftError

    assert isinstance(answer, SyftError), f"expected a refusal, the site answered {answer!r:.300}"
    return str(answer.message)


def gate_refusal(answer: Any, site: str, path: str) -> str:
    """The reason of the API gate's refusal of ``path`` at ``site``."""
    message = refusal(answer)
    prefix = f"{site}: refused: {path} (the site's API gate): "
    assert message.startswith(prefix), f"expected {prefix!r}..., got {message!r}"
    return message[len(prefix):]


def value_of(answer: Any) -> Any:
    """What syft's dispatcher wrapped an allowed call's result in."""
    from syft.service.response import SyftError

    assert not isinstance(answer, SyftError), f"the site refused: {answer.message}"
    return getattr(answer, "value", answer)


SYFT_ERROR_TYPE = re.compile(r"<class '([^']+)'>")
