"""``run.toml``: one researcher's federated run as a file, parsed into a frozen ``RunConfig``.

The file is data, never code (read with the standard library's ``tomllib``). Every key is checked here,
before anything connects or writes, and each error names the key, what was wrong and how to fix it, e.g.
``run.toml: [[sites]] #2 'identity_key': ... copy it from the admin's `fedsite admin identity```.
The model spec and the DP parameters are checked by the same parsers the sites use
(``ModelSpec.parse``, ``DPPlan.from_dict``), so a file that parses here makes a plan the sites can parse.
``researcher.run_template`` writes a commented file that parses back (``fedsite run init``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from models.spec import ModelConfigError, ModelSpec
from policies.dp import DPPlan, DPPlanError
from policies.peers import PeerPinError, check_peer_key
from researcher.run_template import DEFAULT_PASSWORD_ENV

_SITE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")
_SECTIONS = {"run", "researcher", "sites", "model", "dp", "public", "evaluation"}


class RunConfigError(ValueError):
    """``run.toml`` is missing, malformed or holds a value the run cannot use; the message names the key."""


@dataclass(frozen=True)
class SiteEntry:
    """One datasite of the run, as its admin handed it over."""

    name: str  # the site's name in the roster (`fedsite admin identity` prints it)
    url: str  # scheme and host, e.g. https://site-a.example.org (login takes the port apart)
    port: int  # the port `fedsite serve --port` listens on
    identity_key: str  # the site's Ed25519 public key (64 hex), pinned in the plan's roster
    email: str  # the researcher's login at this site
    password_env: str | None  # environment variable holding the password (one of env and file)
    password_file: Path | None  # a file whose first line is the password
    ca: Path | None  # the CA bundle that signed an https site's certificate


@dataclass(frozen=True)
class PublicTexts:
    """Public, unlabelled texts: the public-start recipe's centre and head, and the bias calibration."""

    imdb_test_reviews: int  # this many public IMDB test reviews (seed 1; the evaluation draws seed 0); 0: none
    file: Path | None  # a UTF-8 file with one text per line
    texts: tuple[str, ...]  # texts written in run.toml
    start: bool  # build the model's centre and head from them (needs pooling "mean")
    calibrate: bool  # shift the classifier's bias on them after each round
    positive_share: float  # the population's share of label 1, for the calibration


@dataclass(frozen=True)
class RunConfig:
    """Everything ``fedsite run`` needs, checked; paths are absolute (relative ones are from run.toml)."""

    path: Path  # the run.toml this came from
    output_dir: Path  # run state: run id, plan, submitted functions, checkpoints, report
    dataset: str  # the dataset name every site uploaded
    threshold: int | None  # sites that must survive a round's secure sum; None: a majority
    sites: tuple[SiteEntry, ...]
    model: Mapping[str, Any]  # ModelSpec as JSON, before the public start adds centre and head
    dp: Mapping[str, Any]  # DPPlan as JSON
    public: PublicTexts
    imdb: Path  # a folder with IMDB's test.parquet: the public evaluation data
    test_size: int  # public test reviews evaluated after every round
    test_seed: int

    def digest(self) -> str:
        """SHA-256 of what decides the plan (not the logins): a changed run.toml means a new plan."""
        public = {"n": self.public.imdb_test_reviews, "file": str(self.public.file), "texts": list(self.public.texts),
                  "start": self.public.start}
        decided = {"dataset": self.dataset, "threshold": self.threshold, "model": dict(self.model), "dp": dict(self.dp),
                   "sites": [[s.name, s.identity_key] for s in self.sites], "public": public}
        return hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()


def load_run_config(path: str | Path) -> RunConfig:
    """Read and check ``path``; raises ``RunConfigError`` naming the first bad key and its fix."""
    file = Path(path).resolve()
    if not file.is_file():
        raise RunConfigError(f"{path} does not exist: write one with `fedsite run init {path}`")
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RunConfigError(f"{file.name} is not valid TOML ({exc}): fix the line it names") from None
    return parse_run_config(raw, file)


def parse_run_config(raw: Mapping[str, Any], path: Path) -> RunConfig:
    where = _Where(path)
    unknown = sorted(set(raw) - _SECTIONS)
    if unknown:
        raise where.error(unknown[0], f"is not a section of run.toml; the sections are {sorted(_SECTIONS)}")
    run = where.table(raw, "run")
    researcher = where.table(raw, "researcher")
    where.only(run, "run", {"output_dir", "dataset", "threshold"})
    where.only(researcher, "researcher", {"email", "password_env", "password_file"})
    sites = _sites(where, raw.get("sites"), researcher)
    threshold = run.get("threshold")
    if threshold is not None and (not _is_int(threshold) or not 2 <= threshold <= len(sites)):
        raise where.error("run.threshold", f"must be an int in 2..{len(sites)} (the number of sites), got {threshold!r}")
    evaluation = where.table(raw, "evaluation")
    where.only(evaluation, "evaluation", {"imdb", "test_size", "test_seed"})
    config = RunConfig(path=path, output_dir=where.path(run, "run.output_dir", required=True),
                       dataset=where.string(run, "run.dataset", default="imdb"), threshold=threshold, sites=sites,
                       model=_model(where, raw.get("model")), dp=_dp(where, raw.get("dp")),
                       public=_public(where, raw.get("public", {})),
                       imdb=where.path(evaluation, "evaluation.imdb", required=True),
                       test_size=where.count(evaluation, "evaluation.test_size", default=500, low=1),
                       test_seed=where.count(evaluation, "evaluation.test_seed", default=0, low=0))
    if config.public.start and config.model.get("pooling", "mean") != "mean":
        raise where.error("public.start", "needs model.pooling = \"mean\" (the public start builds a mean-pooling "
                                          "head): set that, or start = false")
    return config


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Where:
    """Error messages that name the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path_ = path

    def error(self, key: str, problem: str) -> RunConfigError:
        return RunConfigError(f"{self.path_.name}: '{key}' {problem}")

    def table(self, raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = raw.get(key, {})
        if not isinstance(value, Mapping):
            raise self.error(key, f"must be a table ([{key}]), got {type(value).__name__}")
        return value

    def only(self, table: Mapping[str, Any], section: str, known: set[str]) -> None:
        unknown = sorted(set(table) - known)
        if unknown:
            raise self.error(f"{section}.{unknown[0]}", f"is not a key of [{section}]; its keys are {sorted(known)}")

    def string(self, table: Mapping[str, Any], key: str, *, default: str | None = None) -> str:
        value = table.get(key.rsplit(".", 1)[-1], default)
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string, got {value!r}")
        return value

    def optional_string(self, table: Mapping[str, Any], key: str) -> str | None:
        return None if key.rsplit(".", 1)[-1] not in table else self.string(table, key)

    def path(self, table: Mapping[str, Any], key: str, *, required: bool = False) -> Path:
        if required and key.rsplit(".", 1)[-1] not in table:
            raise self.error(key, "is required: give a path (relative paths are read from run.toml's folder)")
        text = self.string(table, key)
        return (self.path_.parent / Path(text).expanduser()).resolve()

    def optional_path(self, table: Mapping[str, Any], key: str) -> Path | None:
        return None if key.rsplit(".", 1)[-1] not in table else self.path(table, key)

    def count(self, table: Mapping[str, Any], key: str, *, default: int, low: int) -> int:
        value = table.get(key.rsplit(".", 1)[-1], default)
        if not _is_int(value) or value < low:
            raise self.error(key, f"must be an int >= {low}, got {value!r}")
        return int(value)

    def flag(self, table: Mapping[str, Any], key: str, *, default: bool) -> bool:
        value = table.get(key.rsplit(".", 1)[-1], default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value


_SITE_KEYS = {"name", "url", "identity_key", "email", "password_env", "password_file", "ca"}


def _sites(where: _Where, raw: object, researcher: Mapping[str, Any]) -> tuple[SiteEntry, ...]:
    if not isinstance(raw, list) or not raw:
        raise where.error("sites", "must list at least two sites, each as a [[sites]] table with name, url and "
                                   "identity_key")
    sites = tuple(_site(where, entry, researcher, number) for number, entry in enumerate(raw, start=1))
    if len(sites) < 2:
        raise where.error("sites", "lists one site: a secure sum needs at least two; add a [[sites]] table per site")
    names = [site.name for site in sites]
    for name in names:
        if names.count(name) > 1:
            raise where.error("sites", f"names {name!r} twice: each site appears once in the roster")
    return sites


def _site(where: _Where, raw: object, researcher: Mapping[str, Any], number: int) -> SiteEntry:
    at = f"sites #{number}"
    if not isinstance(raw, Mapping):
        raise where.error(at, "must be a [[sites]] table")
    where.only(raw, at, _SITE_KEYS)
    name = where.string(raw, f"{at}.name")
    if not _SITE_NAME.fullmatch(name):
        raise where.error(f"{at}.name", f"{name!r} is not a site name: lowercase letters, digits and '-', as the "
                                        "admin's `fedsite admin identity` prints it")
    url, port = _url(where, where.string(raw, f"{at}.url"), f"{at}.url")
    try:
        key = check_peer_key(where.string(raw, f"{at}.identity_key").strip().lower())
    except PeerPinError as exc:
        raise where.error(f"{at}.identity_key", f"is refused ({exc})") from None
    email = where.string(raw, f"{at}.email") if "email" in raw else where.string(researcher, "researcher.email")
    if not _EMAIL.fullmatch(email):
        raise where.error(f"{at}.email", f"{email!r} is not an e-mail address: the login the site's admin created")
    env, file = _password_source(where, raw, at) if {"password_env", "password_file"} & set(raw) else \
        _password_source(where, researcher, "researcher")
    ca = where.optional_path(raw, f"{at}.ca")
    if ca is not None and url.startswith("http://"):
        raise where.error(f"{at}.ca", f"is set but {url} is plain http: a CA verifies https only; use https:// or "
                                      "drop ca")
    return SiteEntry(name=name, url=url, port=port, identity_key=key, email=email, password_env=env,
                     password_file=file, ca=ca)


def _url(where: _Where, text: str, key: str) -> tuple[str, int]:
    parts = urlsplit(text.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise where.error(key, f"{text!r} must be http(s)://HOST:PORT, e.g. https://site-a.example.org:8443 (the "
                               "address and port the site's admin gave you)")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}", port


def _password_source(where: _Where, table: Mapping[str, Any], at: str) -> tuple[str | None, Path | None]:
    if "password_env" in table and "password_file" in table:
        raise where.error(f"{at}.password_file", "and password_env are both set: keep one (where the password is read "
                                                 "from)")
    if "password_file" in table:
        return None, where.path(table, f"{at}.password_file")
    env = where.string(table, f"{at}.password_env", default=DEFAULT_PASSWORD_ENV)
    if not _ENV_NAME.fullmatch(env):
        raise where.error(f"{at}.password_env", f"{env!r} is not an environment variable name (the password itself "
                                                "never goes into run.toml)")
    return env, None


def _model(where: _Where, raw: object) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise where.error("model", "is required: a [model] table with name (or a [model.tiny] table) and "
                                   "[model.trainable]")
    spec = {"name": raw.get("name"), **{k: v for k, v in raw.items() if k != "name"}}
    for key in ("centre", "head_init"):
        if key in spec:
            raise where.error(f"model.{key}", "is computed from the public texts ([public] start = true): drop it")
    try:
        ModelSpec.parse(spec, where="model")
    except ModelConfigError as exc:
        keys = re.sub(r"(\w+)((?:\['\w+'\])+)", lambda m: ".".join([m.group(1), *re.findall(r"'(\w+)'", m.group(2))]),
                      str(exc))  # model['trainable'] -> model.trainable, as run.toml spells it
        raise where.error("model", f"is refused: {keys}") from None
    return spec


def _dp(where: _Where, raw: object) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise where.error("dp", "is required: a [dp] table with rounds, local_steps, expected_batch_size, clip_norm, "
                                "delta and target_epsilon")
    try:
        DPPlan.from_dict(raw)
    except DPPlanError as exc:
        raise where.error("dp", f"is refused: {exc}") from None
    return dict(raw)


def _public(where: _Where, raw: object) -> PublicTexts:
    if not isinstance(raw, Mapping):
        raise where.error("public", f"must be a table ([public]), got {type(raw).__name__}")
    where.only(raw, "public", {"imdb_test_reviews", "file", "texts", "start", "calibrate", "positive_share"})
    count = where.count(raw, "public.imdb_test_reviews", default=0, low=0)
    texts = raw.get("texts", [])
    if not isinstance(texts, list) or not all(isinstance(text, str) and text.strip() for text in texts):
        raise where.error("public.texts", "must be a list of non-empty strings (public, unlabelled texts)")
    file = where.optional_path(raw, "public.file")
    given = [key for key, used in (("imdb_test_reviews", count > 0), ("file", file is not None), ("texts", texts))
             if used]
    if len(given) > 1:
        raise where.error(f"public.{given[1]}", f"and public.{given[0]} are both set: keep one source of public texts")
    start, calibrate = where.flag(raw, "public.start", default=True), where.flag(raw, "public.calibrate", default=True)
    if (start or calibrate) and not given:
        raise where.error("public", "has no texts but start or calibrate is true: set imdb_test_reviews, file or "
                                    "texts, or set start = false and calibrate = false")
    share = raw.get("positive_share", 0.5)
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share < 1 or math.isnan(share):
        raise where.error("public.positive_share", f"must be a number in (0, 1), got {share!r}")
    return PublicTexts(imdb_test_reviews=count, file=file, texts=tuple(texts), start=start, calibrate=calibrate,
                       positive_share=float(share))

