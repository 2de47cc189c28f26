"""One object for a researcher's federated run, driven from ``run.toml``: submit, status, train, report.

``Federation.from_toml("run.toml")`` is the whole Python API for a notebook; ``fedsite run ...`` is a thin
layer over it. The run's state lives in the output dir that run.toml names, so each step can be a
separate process:

* ``run.json``: the run id and the digest of the run.toml it was planned from (a changed file is refused:
  the sites approved one plan);
* ``plan.json``: the plan every site was sent (``researcher.federation.make_plan``);
* ``functions/``: the round function's source, as submitted;
* ``train/``: the trainer's checkpoints, ``report.json`` and ``report.png`` (``FederatedTrainer``), from
  which ``train`` resumes after the last finished round.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from policies.durable import read_json, write_json_atomic
from policies.submission import function_name
from policies.syft_client import SiteConnectionError, login, quiet
from researcher.run_config import RunConfig, SiteEntry, load_run_config
from researcher.trainer import PLOT_FILE, REPORT_FILE

if TYPE_CHECKING:
    from policies.contracts import DryRun
    from policies.federated_plan import FederatedPlan

STATE_FILE = "run.json"
PLAN_FILE = "plan.json"
FUNCTIONS_DIR = "functions"
TRAIN_DIR = "train"
PUBLIC_SEED = 1  # public texts drawn from IMDB's test split use seed 1; the evaluation draws seed 0
_SYFT_STATES = {"pending": "pending", "approved": "approved", "rejected": "denied"}


class FederationError(RuntimeError):
    """A step of the run cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class SiteStatus:
    """Where one site stands with this run's request."""

    site: str
    state: str  # "not submitted", "pending", "approved", "denied" or "unreachable"
    reason: str | None = None  # the admin's reason for a denial, or why the site could not be reached


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    sites: tuple[SiteStatus, ...]
    rounds_planned: int
    rounds_done: int  # rounds recorded in report.json
    rounds_lost: int | None  # rounds recorded as lost, where the report records them; None otherwise

    def not_approved(self) -> tuple[SiteStatus, ...]:
        return tuple(site for site in self.sites if site.state != "approved")


def read_password(site: SiteEntry) -> str:
    """The researcher's password at ``site``: the first line of its private file, else its environment variable."""
    if site.password_file is not None:
        path = site.password_file
        if not path.is_file():
            raise FederationError(f"password_file {path} for {site.name} does not exist: create it (first line: the "
                                  "password) or name password_env instead")
        if stat.S_IMODE(path.stat().st_mode) & (stat.S_IRWXG | stat.S_IRWXO):
            raise FederationError(f"password_file {path} is open to other users: `chmod 600 {path}`")
        lines = path.read_text(encoding="utf-8").splitlines()
        password = lines[0] if lines else ""
        if not password:
            raise FederationError(f"password_file {path} is empty: write {site.name}'s password on its first line")
        return password
    env = str(site.password_env)
    password = os.environ.get(env, "")
    if not password:
        raise FederationError(f"{env} is not set: export your password for {site.name} in it (run.toml names it in "
                              "password_env), or set password_file")
    return password


def lost_rounds(raw_report: Mapping[str, Any]) -> int | None:
    """How many rounds report.json records as lost (``RunReport.lost_rounds``); None in a report without them."""
    value = raw_report.get("lost_rounds")
    return len(value) if isinstance(value, list) else None


class Federation:
    """A run planned from ``run.toml``, its state in the output dir the file names."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.output_dir = config.output_dir
        self._handles: list[Any] | None = None
        self.trainer: Any = None  # the FederatedTrainer of the last ``train()``

    @classmethod
    def from_toml(cls, path: str | Path) -> Federation:
        return cls(load_run_config(path))

    # ---- state in the output dir ---------------------------------------------------------------

    @property
    def train_dir(self) -> Path:
        return self.output_dir / TRAIN_DIR

    @property
    def report_path(self) -> Path:
        return self.train_dir / REPORT_FILE

    @property
    def plot_path(self) -> Path:
        return self.train_dir / PLOT_FILE

    def planned(self) -> bool:
        """Whether a plan was made (by prepare or submit) and saved in the output dir."""
        return (self.output_dir / STATE_FILE).is_file()

    def run_id(self) -> str:
        return str(self._state()["run_id"])

    def plan(self) -> FederatedPlan:
        """The plan the sites were sent; refuses before ``submit`` and when run.toml changed since."""
        from policies.federated_plan import FederatedPlan

        self._state()
        return FederatedPlan.parse(read_json(self.output_dir / PLAN_FILE))

    def _state(self) -> dict[str, Any]:
        path = self.output_dir / STATE_FILE
        if not path.is_file():
            raise FederationError(f"nothing submitted from {self.config.path.name} yet ({path} is missing): run "
                                  f"`fedsite run submit {self.config.path}` first")
        state = dict(read_json(path))
        if state.get("config_digest") != self.config.digest():
            raise FederationError(
                f"{self.config.path.name} changed since run {state.get('run_id')} was planned from it: the sites "
                f"approve one plan. Undo the change, or set [run] output_dir to a new folder to plan a new run")
        return state

    # ---- sites -----------------------------------------------------------------------------------

    def handles(self) -> list[Any]:
        """A logged-in ``SiteHandle`` per site (logged in once per Federation)."""
        if self._handles is None:
            self._handles = [self._connect(site) for site in self.config.sites]
        return self._handles

    def _connect(self, site: SiteEntry) -> Any:
        from researcher.federation import SiteHandle

        try:
            client = login(site.url, port=site.port, email=site.email, password=read_password(site), ca=site.ca)
        except SiteConnectionError as exc:
            raise FederationError(f"{site.name}: {exc}") from None
        return SiteHandle(name=site.name, client=client, identity_key=site.identity_key, dataset=self.config.dataset)

    # ---- the four steps ---------------------------------------------------------------------------

    def _check_imdb(self) -> None:
        if not (self.config.imdb / "test.parquet").is_file():
            raise FederationError(f"[evaluation] imdb = {self.config.imdb} holds no test.parquet: point it at the "
                                  "folder with IMDB's test split (public data)")

    def public_texts(self) -> list[str]:
        public = self.config.public
        if public.imdb_test_reviews:
            self._check_imdb()
            from researcher.evaluation import load_test_subset

            frame = load_test_subset(self.config.imdb, public.imdb_test_reviews, seed=PUBLIC_SEED)
            return [str(text) for text in frame["text"]]
        if public.file is not None:
            if not public.file.is_file():
                raise FederationError(f"[public] file {public.file} does not exist: one public text per line")
            texts = [line.strip() for line in public.file.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not texts:
                raise FederationError(f"[public] file {public.file} holds no text: one public text per line")
            return texts
        return list(public.texts)

    def make_plan(self) -> FederatedPlan:
        """A new plan from run.toml (a fresh run id), checked by the parser the sites use; sends nothing."""
        from models import build_from_spec, with_public_start
        from policies.dp import DPPlan
        from researcher.fedavg import flatten_trainable
        from researcher.federation import SiteHandle, make_plan

        config = self.config
        dp = DPPlan.from_dict(config.dp)
        spec = dict(config.model)
        if config.public.start:
            spec = with_public_start(spec, self.public_texts(), max_length=dp.max_length, tail_tokens=dp.tail_tokens)
        vector_length = len(flatten_trainable(build_from_spec(spec)[0])[0])
        roster = [SiteHandle(name=site.name, client=None, identity_key=site.identity_key) for site in config.sites]
        return make_plan(sites=roster, model=spec, dp=config.dp, vector_length=vector_length,
                         threshold=config.threshold, dataset=config.dataset)

    def prepare(self) -> FederatedPlan:
        """The run's plan: made from run.toml and saved in the output dir the first time, read back after."""
        if not self.planned():
            plan = self.make_plan()
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.output_dir / PLAN_FILE, plan.to_dict())
            write_json_atomic(self.output_dir / STATE_FILE, {"run_id": plan.run_id,
                                                             "config_digest": self.config.digest()})
        return self.plan()

    def dry_run(self, site: int = 0) -> DryRun:
        """The exact round function of ``prepare()``'s plan, run here on one site's mock (nothing is sent)."""
        from researcher.federation import dry_run_on_mock

        return dry_run_on_mock(self.handles()[site], self.prepare())

    def submit(self) -> dict[str, str]:
        """Plan once, then ask every site to run the plan's round function; a second call sends nothing new.

        Returns site -> "submitted" or "already submitted". The plan is saved before anything is sent, so
        a submit that a down site interrupted is finished by running it again.
        """
        from researcher.federation import submit

        plan = self.prepare()
        outcome = {}
        for handle in self.handles():
            if self._request(handle, plan.run_id) is not None:
                outcome[handle.name] = "already submitted"
                continue
            submit(handle, plan, self.output_dir / FUNCTIONS_DIR)
            outcome[handle.name] = "submitted"
        return outcome

    def status(self) -> RunStatus:
        """Each site's decision on this run's request, and the rounds done so far."""
        run_id = self.run_id()
        connected = self._try_handles()
        sites = tuple(self._site_status(site.name, connected[site.name], run_id) for site in self.config.sites)
        done, lost = 0, None
        if self.report_path.is_file():
            raw = read_json(self.report_path)
            done, lost = len(raw.get("rounds", [])), lost_rounds(raw)
        return RunStatus(run_id=run_id, sites=sites, rounds_planned=self.plan().dp.rounds,
                         rounds_done=done, rounds_lost=lost)

    def train(self, *, progress: bool = True) -> Any:
        """Run (or resume) the rounds once every site approved; returns the ``RunReport``."""
        from researcher.trainer import FederatedTrainer, TrainerSettings

        self._check_imdb()
        status = self.status()
        waiting = status.not_approved()
        if waiting:
            raise FederationError(f"run {status.run_id} cannot train yet: " + "; ".join(
                f"{site.site} {site.state}" + (f" ({site.reason})" if site.reason else "") for site in waiting)
                + ". Training needs every site's approval (`fedsite run status` shows them)")
        public = self.config.public
        settings = TrainerSettings(run_dir=self.train_dir, imdb_source=str(self.config.imdb),
                                   test_size=self.config.test_size, test_seed=self.config.test_seed,
                                   progress=progress, positive_share=public.positive_share,
                                   calibration_texts=tuple(self.public_texts()) if public.calibrate else ())
        self.trainer = FederatedTrainer(self.handles(), self.plan(), settings)
        return self.trainer.run()

    def report(self) -> Any:
        """The ``RunReport`` of the rounds finished so far (report.json in the output dir)."""
        from researcher.report import RunReport

        self._state()
        if not self.report_path.is_file():
            raise FederationError(f"no round of run {self.run_id()} has finished yet ({self.report_path} is missing): "
                                  "run `fedsite run train` first")
        return RunReport.load_json(self.report_path)

    def report_document(self) -> dict[str, Any]:
        """report.json as written, with any fields the typed report does not read (e.g. lost rounds)."""
        self.report()
        return dict(read_json(self.report_path))

    # ---- helpers ----------------------------------------------------------------------------------

    def _request(self, handle: Any, run_id: str) -> Any | None:
        """This run's request at the site, as the researcher's client lists it; None if there is none."""
        with quiet():
            requests = list(handle.client.requests)
        name = function_name(run_id)
        ours = [r for r in requests if getattr(getattr(r, "code", None), "service_func_name", None) == name]
        return ours[-1] if ours else None

    def _try_handles(self) -> dict[str, Any]:
        """Each site's handle, or the ``FederationError`` that says why it could not be reached."""
        if self._handles is not None:
            return {handle.name: handle for handle in self._handles}
        connected: dict[str, Any] = {}
        for site in self.config.sites:
            try:
                connected[site.name] = self._connect(site)
            except FederationError as exc:
                connected[site.name] = exc
        if not any(isinstance(value, FederationError) for value in connected.values()):
            self._handles = list(connected.values())  # every site answered: log in once per Federation
        return connected

    def _site_status(self, name: str, handle: Any, run_id: str) -> SiteStatus:
        if isinstance(handle, FederationError):
            return SiteStatus(name, "unreachable", str(handle))
        request = self._request(handle, run_id)
        if request is None:
            return SiteStatus(name, "not submitted", "no request for this run: `fedsite run submit`")
        with quiet():
            state = _SYFT_STATES.get(str(request.status).rsplit(".", 1)[-1].lower(), str(request.status))
            reason = str(request.deny_reason) if state == "denied" and getattr(request, "deny_reason", None) else None
        return SiteStatus(name, state, reason)
