"""The HTTP(S) app a `fedsite serve` site answers with: syft's routes, minus those a site must not serve.

Built as ``syft.server.uvicorn.app_factory`` builds it, without CORS and without FastAPI's
self-description, with only ``SERVED_ROUTES``, and with a /login that answers an unknown e-mail and a
wrong password alike (in the same time).
"""

from __future__ import annotations

import secrets
from typing import Any

# syft's HTTP routes a site serves (under /api/v2), each with why. Every API call enters through
# /api_call and meets the site's gate (datasites.gate); the rest of syft's routes are not mounted:
# /register and the password-reset pair (accounts are the admin's business: `fedsite admin
# add-researcher`), and /stream/{peer}/..., an unauthenticated proxy to a peer's blob route (a site has no peers).
SERVED_ROUTES = {
    "/": "liveness: answers {'status': 'ok'}",
    "/metadata": "the site's public metadata (name, id, versions), read by every client before login",
    "/metadata_capnp": "the same metadata in syft's binary form, which syft's client asks for",
    "/api": "the API description of a key's role, which the client fetches after login",
    "/api_call": "every signed API call: the gate checks each one before syft dispatches it",
}


def make_app(worker: Any) -> Any:
    """syft's HTTP API for ``worker`` (as syft.server.uvicorn.app_factory builds it), without CORS, with only
    ``SERVED_ROUTES`` and a /login that does not tell an unknown e-mail from a wrong password."""
    from fastapi import APIRouter, FastAPI
    from syft.server.routes import make_routes

    app = FastAPI(title=worker.name, docs_url=None, redoc_url=None, openapi_url=None)  # no self-description
    api_router = APIRouter()
    for route in make_routes(worker=worker).routes:
        if getattr(route, "path", None) in SERVED_ROUTES:
            api_router.routes.append(route)
    api_router.add_api_route("/login", _login_route(worker), methods=["POST"], name="login")
    app.include_router(api_router, prefix="/api/v2")
    return app


def _login_route(worker: Any) -> Any:
    """syft's /login, answering every failure alike: syft says "Item not found." for an unknown e-mail and
    "Invalid credentials." for a wrong password, which lets anyone list the site's accounts."""
    from typing import Annotated

    from fastapi import Body, Response
    from syft.serde.serialize import _serialize as serialize
    from syft.server.credentials import UserLoginCredentials
    from syft.service.context import UnauthedServiceContext
    from syft.service.response import SyftError
    from syft.service.user.user import UserPrivateKey, check_pwd, salt_and_hash_password
    from syft.types.errors import SyftException

    # syft checks the password (bcrypt, cost 12: ~0.3 s) only for an e-mail it knows; an unknown one answers at
    # once. Checking against this hash then makes both take as long.
    _, unknown_user_hash = salt_and_hash_password(secrets.token_urlsafe(18), 12)

    def login(email: str, password: str) -> Response:
        response: Any = SyftError(message="Invalid credentials.")
        try:
            credentials = UserLoginCredentials(email=email, password=password)
            context = UnauthedServiceContext(server=worker, login_credentials=credentials)
            if worker.services.user.stash.email_exists(email=email).unwrap() is not True:
                check_pwd(password, unknown_user_hash)
            result = worker.services.user.exchange_credentials(context=context).value
            if isinstance(result, UserPrivateKey):
                response = result
        except (SyftException, ValueError):
            pass  # the same answer for an unknown e-mail, a wrong password and a malformed request
        return Response(serialize(response, to_bytes=True), media_type="application/octet-stream")

    # FastAPI reads the annotations; this module's are strings (PEP 563), so give it the objects
    login.__annotations__ = {"email": Annotated[str, Body()], "password": Annotated[str, Body()], "return": Response}
    return login
