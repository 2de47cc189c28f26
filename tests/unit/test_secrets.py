from __future__ import annotations

from pathlib import Path

import pytest

from datasites.errors import FedsiteError
from datasites.secrets import admin_password, check_password_strength, read_secret

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("password", "message"),
    [
        ("Sh0rt!", r"too weak \(6 characters, need 12\+\)"),
        ("changethis-Now-1", r"contains a common or default password"),
        ("MyPassword-2026", r"contains a common or default password"),
        ("alllowercaseletters", r"uses 1 of: lower, upper, digits, symbols"),
        ("lowerandnumbers9876", r"uses 2 of: lower, upper, digits, symbols"),
    ],
)
def test_weak_passwords_are_refused_with_a_way_to_make_one(password: str, message: str) -> None:
    with pytest.raises(FedsiteError, match=message + r".*secrets.token_urlsafe"):
        check_password_strength(password)


@pytest.mark.parametrize("password", ["Site-admin-Pw-2026!", "kq3vXb2_Hn8e-Zt1RwYp0aLs", "a" * 8 + "b" * 8 + "c" * 4])
def test_strong_passwords_pass(password: str) -> None:
    assert check_password_strength(password) == password


def test_admin_password_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDSITE_ADMIN_PASSWORD", raising=False)

    with pytest.raises(FedsiteError, match=r"no admin password: set FEDSITE_ADMIN_PASSWORD or pass a secret file"):
        admin_password()


def test_admin_password_from_env_or_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDSITE_ADMIN_PASSWORD", "From-the-Env-2026!")
    secret = tmp_path / "pw"
    secret.write_text("From-a-File-2026!\n")

    assert admin_password() == "From-the-Env-2026!"
    assert admin_password(secret) == "From-a-File-2026!"


def test_missing_secret_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FedsiteError, match=r"admin password file .*/absent does not exist"):
        read_secret(env="X_UNSET", file=tmp_path / "absent", what="admin password")
