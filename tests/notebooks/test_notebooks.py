"""The three notebooks, executed top to bottom in a fresh kernel with their small default settings.

Each runs as a user would run it (working directory ``notebooks/``, kernel ``python3``), with IMDB
from the test copy and its sites' data dirs under pytest's temporary folder. A test fails if any cell
raises, if a notebook stops showing what it is there to show, or if any output contains the text of
an IMDB training review: the notebooks show private data as statistics only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from tests.conftest import IMDB_DIR, REPO

pytestmark = pytest.mark.notebooks

NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT_S = 300
# A review's first characters; pandas shows the first 47 of a long string even at its default width.
REVIEW_PREFIX = 40

EXPECTED = {
    "01_data_owner_setup.ipynb": (
        r"identity key \(Ed25519 public, hex\): [0-9a-f]{64}\n",
        r"imdb\s+8\s+1e-05\s+150\n",
        r"rita@uni\.org \(id [0-9a-f]{32}\): spent epsilon 0\.00, remaining 8\.00",
    ),
    "02_data_owner_review.ipynb": (
        r"no problems: the request can be approved",
        r"approval refused: request [0-9a-f]{32} cannot be approved: roster entry site-a carries key [0-9a-f]{16}: "
        r"KEY DIFFERS from this site's [0-9a-f]{16} \(a substituted or outdated key\)",
        # 16 events of the review and the run, and the API gate's 2 refusals of syft's client refreshing the
        # researcher's requests (migration._get_object) when it shows their deny reasons
        r"audit\.jsonl: 18 entries, chain intact, head [0-9a-f]{64}\n  api_call_refused: 2\n(  \w+: \d+\n)*"
        r"  request_denied: 1\n",
        r"tampered copy refused: .*line 1 was modified after it was written",
    ),
    "03_researcher_federated_training.ipynb": (
        r"DryRun\(trainable_parameters=\d+, mock_rows=\d+, mock_loss=",
        r"site +status +reason\nsite-a +pending\nsite-b +pending\nsite-c +pending\nrounds: 0 done of 2\n",
        r"site-a +approved\nsite-b +approved\nsite-c +approved\nrounds: 0 done of 2\n",
        r"run run-[0-9a-f]{12}: 2 rounds; files in the run folder: .*report\.png",
        r"refused: site-a: round 2 is beyond the 2 approved rounds \(0\.\.1\)",
    ),
}


def _execute(path: Path, work: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "FEDSITE_IMDB": str(IMDB_DIR), "FEDSITE_NOTEBOOK_WORK": str(work)}
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    try:
        client.execute(env=env)
    except CellExecutionError as exc:
        pytest.fail(f"{path.name}: a cell raised\n{exc}")
    return notebook


def _output_text(notebook: nbformat.NotebookNode) -> str:
    """Everything the notebook printed or displayed as text, in cell order."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":  # one print may arrive in several chunks: join them as written
                parts.append(output.text)
            else:
                data = output.get("data", {})
                parts += ["\n", data.get("text/plain", ""), "\n", data.get("text/html", ""), "\n"]
    return "".join(parts)


def _errors(notebook: nbformat.NotebookNode) -> list[str]:
    return [f"cell {index}: {output.ename}: {output.evalue}" for index, cell in enumerate(notebook.cells)
            for output in cell.get("outputs", []) if output.output_type == "error"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_top_to_bottom(name: str, imdb_train: pd.DataFrame, tmp_path: Path) -> None:
    # Prepare
    path = NOTEBOOKS / name
    assert all(not cell.get("outputs") for cell in nbformat.read(path, as_version=4).cells), \
        f"{name} is committed with outputs: clear them (Kernel > Restart & Clear Output) before committing"

    # Execute
    notebook = _execute(path, tmp_path)

    # Assert
    assert _errors(notebook) == []
    text = _output_text(notebook)
    missing = [pattern for pattern in EXPECTED[name] if not re.search(pattern, text)]
    assert missing == [], f"{name} no longer shows {missing}"
    leaked = [review[:REVIEW_PREFIX] for review in imdb_train["text"].str.strip()
              if len(review) >= REVIEW_PREFIX and review[:REVIEW_PREFIX] in text]
    assert leaked == [], f"{name} shows the text of {len(leaked)} IMDB training review(s), e.g. {leaked[0]!r}"
