"""run.toml: the template `fedsite run init` writes parses back, and every bad key is named with its fix."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsite.cli import main
from researcher.federation_api import Federation, FederationError, SiteStatus, lost_rounds, read_password
from researcher.run_config import RunConfigError, load_run_config
from researcher.run_template import PLACEHOLDER_KEY, TemplateSite, render_run_toml

pytestmark = pytest.mark.unit

KEY_A = Ed25519PrivateKey.from_private_bytes(b"a" * 32).public_key().public_bytes_raw().hex()
KEY_B = Ed25519PrivateKey.from_private_bytes(b"b" * 32).public_key().public_bytes_raw().hex()
SITES = (TemplateSite("site-a", "http://127.0.0.1:8081", KEY_A), TemplateSite("site-b", "https://b.example.org:8443",
                                                                             KEY_B))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def template(**overrides: object) -> str:
    return render_run_toml(sites=SITES, imdb="imdb", **overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize("quick", [False, True])
def test_the_template_parses_back(tmp_path: Path, quick: bool) -> None:
    # Prepare
    path = write(tmp_path, template(quick=quick))

    # Execute
    config = load_run_config(path)

    # Assert: the sites as given, paths from the file's folder, the model and plan the sites will parse
    assert [(s.name, s.url, s.port, s.identity_key) for s in config.sites] == [
        ("site-a", "http://127.0.0.1", 8081, KEY_A), ("site-b", "https://b.example.org", 8443, KEY_B)]
    assert config.sites[0].password_env == "FEDSITE_RESEARCHER_PASSWORD" and config.sites[0].password_file is None
    assert config.output_dir == tmp_path / "fedsite-run" and config.imdb == tmp_path / "imdb"
    assert config.dp["rounds"] == (2 if quick else 3) and config.dp["target_epsilon"] == 8.0
    assert (config.model.get("tiny") is not None) == quick
    assert config.model["trainable"]["kind"] == "lora"
    assert config.public.imdb_test_reviews == (64 if quick else 256) and config.public.start and config.public.calibrate


def test_the_template_without_sites_asks_for_the_keys(tmp_path: Path) -> None:
    path = write(tmp_path, render_run_toml())
    assert PLACEHOLDER_KEY in path.read_text()
    with pytest.raises(RunConfigError, match=r"'sites #1\.identity_key' is refused .*fedsite admin identity"):
        load_run_config(path)


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


ERRORS = [
    # (what the file says instead, the key the error names, and the fix it gives)
    (("[run]\n", "[runs]\n"), r"'runs' is not a section of run\.toml; the sections are"),
    (('output_dir = "fedsite-run"', 'outdir = "x"'), r"'run\.outdir' is not a key of \[run\]; its keys are"),
    (('output_dir = "fedsite-run"', ""), r"'run\.output_dir' is required: give a path"),
    (('# threshold = 2', "threshold = 5"), r"'run\.threshold' must be an int in 2\.\.2 \(the number of sites\)"),
    (('email = "you@example.org"', 'email = "nobody"'), r"'sites #1\.email' 'nobody' is not an e-mail address"),
    (('password_env = "FEDSITE_RESEARCHER_PASSWORD"', 'password_env = "MY PASSWORD"'),
     r"'researcher\.password_env' 'MY PASSWORD' is not an environment variable name"),
    (('password_env = "FEDSITE_RESEARCHER_PASSWORD"',
      'password_env = "PW"\npassword_file = "pw.txt"'), r"'researcher\.password_file' and password_env are both set"),
    (('name = "site-a"', 'name = "Site A"'), r"'sites #1\.name' 'Site A' is not a site name"),
    (('name = "site-b"', 'name = "site-a"'), r"'sites' names 'site-a' twice"),
    (('url = "http://127.0.0.1:8081"', 'url = "http://127.0.0.1"'),
     r"'sites #1\.url' 'http://127.0.0.1' must be http\(s\)://HOST:PORT"),
    (('url = "http://127.0.0.1:8081"', 'url = "ftp://127.0.0.1:8081"'), r"'sites #1\.url' .* must be http\(s\)://"),
    ((f'identity_key = "{KEY_B}"', f'identity_key = "{KEY_B}"\nca = "ca.pem"\nport = 1'),
     r"'sites #2\.port' is not a key of \[sites #2\]"),
    ((f'identity_key = "{KEY_A}"', f'identity_key = "{KEY_A}"\nca = "ca.pem"'),
     r"'sites #1\.ca' is set but http://127\.0\.0\.1 is plain http: a CA verifies https only"),
    ((f'identity_key = "{KEY_A}"', 'identity_key = "' + "02" + "00" * 31 + '"'),
     r"'sites #1\.identity_key' is refused .*ask the peer's admin for its key again"),
    (('name = "all-MiniLM-L6-v2"', 'name = "../secret"'), r"'model' is refused: model\.name '\.\./secret' is not a model name"),
    (('kind = "lora"', 'kind = "lora"\ncentre = [0.0]'), r"'model' is refused: model\.trainable needs 'kind' and only"),
    (('seed = 0                   # seeds the weights', 'centre = [1.0]\nseed = 0  # seeds the weights'),
     r"'model\.centre' is computed from the public texts"),
    (('clip_norm = 1.0', 'clip_norm = -1.0'), r"'dp' is refused: .*clip_norm"),
    (('rounds = 3', 'round = 3'), r"'dp' is refused: unknown DP plan fields \['round'\]"),
    (('imdb_test_reviews = 256', 'imdb_test_reviews = 256\ntexts = ["a"]'),
     r"'public\.texts' and public\.imdb_test_reviews are both set: keep one source"),
    (('imdb_test_reviews = 256', 'imdb_test_reviews = 0'), r"'public' has no texts but start or calibrate is true"),
    (('positive_share = 0.5', 'positive_share = 1.5'), r"'public\.positive_share' must be a number in \(0, 1\)"),
    (('calibrate = true', 'calibrate = "yes"'), r"'public\.calibrate' must be true or false"),
    (('pooling = "mean"', 'pooling = "cls"'), r"'public\.start' needs model\.pooling = \"mean\""),
    (('test_size = 500', 'test_size = 0'), r"'evaluation\.test_size' must be an int >= 1, got 0"),
    (('imdb = "imdb"', ''), r"'evaluation\.imdb' is required"),
]


@pytest.mark.parametrize(("change", "error"), ERRORS, ids=[e[1][:40] for e in ERRORS])
def test_every_bad_key_is_named_with_its_fix(tmp_path: Path, change: tuple[str, str], error: str) -> None:
    path = write(tmp_path, _replace(template(), *change))
    with pytest.raises(RunConfigError, match=error):
        load_run_config(path)


def test_one_site_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, render_run_toml(sites=SITES[:1], imdb="imdb"))
    with pytest.raises(RunConfigError, match=r"'sites' lists one site: a secure sum needs at least two"):
        load_run_config(path)


def test_invalid_toml_and_a_missing_file_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(RunConfigError, match=r"does not exist: write one with `fedsite run init"):
        load_run_config(tmp_path / "absent.toml")
    with pytest.raises(RunConfigError, match=r"run\.toml is not valid TOML \(.*line 1.*\): fix the line it names"):
        load_run_config(write(tmp_path, "[run\n"))


def test_a_password_comes_from_the_named_variable_or_a_private_file(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: site-a reads a variable, site-b a file
    text = _replace(template(), f'identity_key = "{KEY_B}"', f'identity_key = "{KEY_B}"\npassword_file = "pw.txt"')
    config = load_run_config(write(tmp_path, text))
    site_a, site_b = config.sites
    monkeypatch.delenv("FEDSITE_RESEARCHER_PASSWORD", raising=False)
    secret = tmp_path / "pw.txt"

    # Execute / Assert
    with pytest.raises(FederationError, match=r"FEDSITE_RESEARCHER_PASSWORD is not set: export your password for "
                                              r"site-a"):
        read_password(site_a)
    monkeypatch.setenv("FEDSITE_RESEARCHER_PASSWORD", "from-env")
    assert read_password(site_a) == "from-env"
    with pytest.raises(FederationError, match=r"password_file .*pw\.txt for site-b does not exist"):
        read_password(site_b)
    secret.write_text("from-file\n")
    os.chmod(secret, 0o644)
    with pytest.raises(FederationError, match=r"is open to other users: `chmod 600 "):
        read_password(site_b)
    os.chmod(secret, 0o600)
    assert read_password(site_b) == "from-file"


def test_steps_before_submit_and_after_a_change_are_refused(tmp_path: Path) -> None:
    # Prepare: a run planned from the file (its state as submit writes it), then the file changes
    path = write(tmp_path, template())
    federation = Federation.from_toml(path)
    with pytest.raises(FederationError, match=r"nothing submitted from run\.toml yet .*`fedsite run submit "):
        federation.plan()
    federation.output_dir.mkdir()
    (federation.output_dir / "run.json").write_text(
        f'{{"run_id": "run-0123456789ab", "config_digest": "{federation.config.digest()}"}}')
    (federation.output_dir / "plan.json").write_text('{"run_id": "run-0123456789ab"}')
    assert federation.run_id() == "run-0123456789ab"
    with pytest.raises(FederationError, match=r"no round of run run-0123456789ab has finished yet"):
        federation.report()

    # Execute: the DP parameters change after the submit
    write(tmp_path, _replace(template(), "rounds = 3", "rounds = 4"))
    changed = Federation.from_toml(path)

    # Assert
    with pytest.raises(FederationError, match=r"run\.toml changed since run run-0123456789ab was planned from it: "
                                              r"the sites approve one plan\. .*output_dir to a new folder"):
        changed.plan()


def test_lost_rounds_are_read_where_the_report_has_them() -> None:
    assert lost_rounds({"rounds": []}) is None
    assert lost_rounds({"rounds": [], "lost_rounds": []}) == 0
    assert lost_rounds({"rounds": [], "lost_rounds": [{"round_index": 1}, {"round_index": 2}]}) == 2


def test_init_writes_once_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    target = tmp_path / "sub" / "run.toml"
    sites = [f"site-a,http://127.0.0.1:8081,{KEY_A}", f"site-b,http://127.0.0.1:8082,{KEY_B}"]
    first = main(["run", "init", str(target), "--quick", "--imdb", str(tmp_path), *(f"--site={s}" for s in sites)])
    out = capsys.readouterr().out
    second = main(["run", "init", str(target)])
    err = capsys.readouterr().err

    # Assert
    assert first == 0 and out.startswith(f"wrote {target}: edit it, then `fedsite run submit {target}`")
    assert [s.name for s in load_run_config(target).sites] == ["site-a", "site-b"]
    assert second == 2 and re.search(r"fedsite: error: .*run\.toml exists: `fedsite run init` never overwrites", err)


def test_status_renders_each_site_with_the_denial_reason() -> None:
    from fedsite.run_cli import render_status
    from researcher.federation_api import RunStatus

    status = RunStatus(run_id="run-0123456789ab", rounds_planned=3, rounds_done=1, rounds_lost=None, sites=(
        SiteStatus("site-a", "approved"), SiteStatus("site-b", "denied", "too many rounds\x1b[2J")))
    text = render_status(status)
    assert re.search(r"^site-a +approved$", text, re.MULTILINE)
    assert re.search(r"^site-b +denied +too many rounds", text, re.MULTILINE) and "\x1b" not in text
    assert text.endswith("rounds: 1 done of 3")


def test_the_report_shows_accuracy_with_its_standard_error_and_epsilon_per_site() -> None:
    from fedsite.run_cli import render_report
    from researcher.report import LostRound

    # Prepare: round 0 without a standard error of its own (binomial over 100 reviews), round 1 with one
    rounds = [{"round_index": 0, "accuracy": 0.5, "mean_loss": 0.69, "epsilon_spent": {"site-a": 4.0, "site-b": 4.1},
               "dropped": []},
              {"round_index": 1, "accuracy": 0.75, "accuracy_se": 0.01, "mean_loss": 0.6,
               "epsilon_spent": {"site-a": 8.0}, "dropped": ["site-b"]}]

    # Execute
    lost = LostRound(round_index=2, attempt=0, stage="consistency_check", reason="too few answers",
                     released=("site-a",), epsilon_spent={"site-a": 9.0})
    text = render_report({"run_id": "run-0123456789ab", "rounds": rounds, "lost_rounds": [lost.to_dict()]},
                         test_size=100)

    # Assert
    lines = text.splitlines()
    assert lines[0].startswith("run run-0123456789ab: 2 rounds (accuracy on 100 public test reviews, +- its standard")
    assert lines[1].split() == ["round", "accuracy", "loss", "eps", "site-a", "eps", "site-b"]
    assert lines[2].split() == ["0", "0.500", "+-", "0.050", "0.6900", "4.000", "4.100"]
    assert lines[3].split() == ["1", "0.750", "+-", "0.010", "0.6000", "8.000", "-", "dropped:", "site-b"]
    assert lines[4] == ("lost: round 2 lost at consistency_check: too few answers; spent by site-a (epsilon 9.00)")


def test_a_site_that_does_not_answer_shows_as_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsite.processes import free_port

    # Prepare: a submitted run whose sites listen nowhere
    monkeypatch.setenv("FEDSITE_RESEARCHER_PASSWORD", "not-used")
    closed = [TemplateSite(s.name, f"http://127.0.0.1:{free_port()}", s.identity_key) for s in SITES]
    federation = Federation.from_toml(write(tmp_path, render_run_toml(sites=closed, imdb="imdb")))
    federation.output_dir.mkdir()
    (federation.output_dir / "run.json").write_text(
        f'{{"run_id": "run-0123456789ab", "config_digest": "{federation.config.digest()}"}}')
    plan = {"format": 1, "run_id": "run-0123456789ab", "dataset": "imdb",
            "model": {"name": None, "tiny": {"hidden_size": 32}, "trainable": {"kind": "lora"}},
            "dp": {"clip_norm": 1.0, "delta": 1e-5, "expected_batch_size": 16, "local_steps": 2, "rounds": 3,
                   "target_epsilon": 3.0},
            "secure_sum": {"vector_length": 10, "clip": 0.5, "quantisation_bits": 24, "threshold": 2,
                           "modulus_bits": 32, "neighbourhood_size": None},
            "roster": [[s.name, s.identity_key] for s in SITES]}
    (federation.output_dir / "plan.json").write_text(json.dumps(plan))

    # Execute
    status = federation.status()

    # Assert: both unreachable, each with the connection's reason; nothing trained
    assert [(s.site, s.state) for s in status.sites] == [("site-a", "unreachable"), ("site-b", "unreachable")]
    assert all(s.reason and s.reason.startswith(f"{s.site}: ") for s in status.sites), status.sites
    assert (status.rounds_done, status.rounds_planned, status.rounds_lost) == (0, 3, None)


def test_init_refuses_sites_that_would_not_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "run.toml"
    code = main(["run", "init", str(target), f"--site=site-a,http://127.0.0.1,{KEY_A}",
                 f"--site=site-b,http://127.0.0.1:8082,{KEY_B}"])
    err = capsys.readouterr().err
    assert code == 2 and "'sites #1.url' 'http://127.0.0.1' must be http(s)://HOST:PORT" in err
    assert not target.exists()


def test_train_without_the_public_test_data_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a planned run whose [evaluation] imdb folder is empty
    path = write(tmp_path, template())
    federation = Federation.from_toml(path)
    federation.output_dir.mkdir()
    (federation.output_dir / "run.json").write_text(
        f'{{"run_id": "run-0123456789ab", "config_digest": "{federation.config.digest()}"}}')
    (federation.output_dir / "plan.json").write_text('{"run_id": "run-0123456789ab"}')

    # Execute
    code = main(["run", "train", str(path)])

    # Assert: refused before any site is contacted
    err = capsys.readouterr().err
    assert code == 2 and f"[evaluation] imdb = {tmp_path / 'imdb'} holds no test.parquet: point it at" in err
