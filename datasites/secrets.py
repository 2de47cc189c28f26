"""The site admin's password: required, never defaulted, never weak.

PySyft ships a well-known root login (info@openmined.org / changethis). A Fedsite site never runs
with it: the admin password must come from ``$FEDSITE_ADMIN_PASSWORD`` or a secret file, and a weak
one is refused before the server starts.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

from datasites.errors import FedsiteError

PASSWORD_ENV = "FEDSITE_ADMIN_PASSWORD"
MIN_LENGTH = 12
_COMMON = {"changethis", "password", "passw0rd", "letmein", "qwerty", "iloveyou", "openmined"}
GENERATE_HINT = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(18))'"


def read_secret(*, env: str, file: str | os.PathLike[str] | None, what: str) -> str:
    """A secret from a file (first line) if given, else from the environment variable; required."""
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FedsiteError(f"{what} file {path} does not exist: create it or set {env}")
        secret = path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
    else:
        secret = os.environ.get(env, "")
    if not secret:
        raise FedsiteError(f"no {what}: set {env} or pass a secret file; {GENERATE_HINT}")
    return secret


def check_password_strength(password: str, *, what: str = "admin password") -> str:
    """Refuse short, common or single-class passwords; the error says how to make a good one."""
    lowered = password.lower()
    if len(password) < MIN_LENGTH:
        raise FedsiteError(f"{what} is too weak ({len(password)} characters, need {MIN_LENGTH}+): {GENERATE_HINT}")
    if any(word in lowered for word in _COMMON):
        raise FedsiteError(f"{what} is too weak (contains a common or default password): {GENERATE_HINT}")
    classes = [string.ascii_lowercase, string.ascii_uppercase, string.digits, string.punctuation]
    used = sum(any(ch in cls for ch in password) for cls in classes)
    if used < 3 and len(password) < 20:
        raise FedsiteError(
            f"{what} is too weak (uses {used} of: lower, upper, digits, symbols; need 3, or 20+ characters): "
            f"{GENERATE_HINT}"
        )
    return password


def admin_password(file: str | os.PathLike[str] | None = None) -> str:
    return check_password_strength(read_secret(env=PASSWORD_ENV, file=file, what="admin password"))
