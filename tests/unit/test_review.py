"""Static review of submitted code: every category, every aliasing evasion, a clean function, the hash."""

from __future__ import annotations

import hashlib
from dataclasses import FrozenInstanceError

import pytest

from policies.review import Category, CodeReview, CodeReviewError, Finding, code_hash, review_code

pytestmark = pytest.mark.unit

# What a researcher submits: the source syft stores as raw_code, decorator included.
CLEAN_TRAINING_FUNCTION = '''\
@sy.syft_function(input_policy=sy.ExactMatch(data=asset), output_policy=sy.SingleExecutionExactOutput())
def local_round(data, global_weights, plan, roster):
    """One round of DP-SGD on this site's partition; returns only the masked update."""
    import math
    from collections import OrderedDict

    import numpy as np
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from policies.site_runtime import run_stage
    from models import TrainableSet

    class Classifier(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.bert = BertForSequenceClassification(config)

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits

    config = BertConfig(vocab_size=plan["vocab_size"], hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=2)
    model = Classifier(config)
    model.load_state_dict(OrderedDict((k, torch.tensor(np.asarray(v))) for k, v in global_weights.items()))
    steps = math.ceil(plan["local_epochs"] * len(data) / plan["batch_size"])
    loss_fn = torch.nn.CrossEntropyLoss()
    trainable = TrainableSet(kind="full")
    return run_stage(data, model=model, loss_fn=loss_fn, steps=steps, plan=plan, trainable=trainable)
'''


def hits(review: CodeReview) -> set[tuple[str, int, str]]:
    """(category, line, resolved name) of every finding."""
    return {(f.category.value, f.line, f.detail.split(": ")[0]) for f in review.findings}


# --- a clean function ---------------------------------------------------------------------------


def test_site_internals_other_than_the_runtime_are_flagged() -> None:
    # Execute
    review = review_code("from policies.dp import local_dp_round\nfrom policies.approvals import Approval\n")

    # Assert
    assert {(f.category.value, f.detail.split(": ")[0]) for f in review.findings} == {
        ("dynamic-code", "policies.dp.local_dp_round"), ("file", "policies.approvals.Approval")}


def test_a_realistic_training_function_is_clean() -> None:
    # Execute
    review = review_code(CLEAN_TRAINING_FUNCTION)

    # Assert
    assert review.findings == ()
    assert review.verdict == "clean"
    assert review.imports == (
        "math", "collections", "numpy", "torch", "transformers", "policies.site_runtime", "models",
    )
    assert review.code_sha256 == code_hash(CLEAN_TRAINING_FUNCTION)


# --- each category ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # file
        ("f = open('/etc/passwd')", ("file", 1, "builtins.open")),
        ("import pathlib\npathlib.Path('k').read_bytes()", ("file", 2, "pathlib.Path")),
        ("from pathlib import Path\nPath('out').write_text('x')", ("file", 2, "pathlib.Path")),
        ("import os\nos.remove('ledger.jsonl')", ("file", 2, "os.remove")),
        ("import os\nos.listdir('/data')", ("file", 2, "os.listdir")),
        ("import shutil\nshutil.copy('a', 'b')", ("file", 2, "shutil.copy")),
        ("import torch\ntorch.save(model, 'm.pt')", ("file", 2, "torch.save")),
        ("from policies.budget import BudgetBook", ("file", 1, "policies.budget.BudgetBook")),
        ("import policies.ledger as ledger\nledger.PrivacyLedger(d, 'imdb', 'r')", ("file", 2, "policies.ledger.PrivacyLedger")),
        # network
        ("import socket\nsocket.create_connection(('h', 80))", ("network", 2, "socket.create_connection")),
        ("import urllib.request\nurllib.request.urlopen(u)", ("network", 2, "urllib.request.urlopen")),
        ("import http.client\nhttp.client.HTTPConnection('h')", ("network", 2, "http.client.HTTPConnection")),
        ("import requests\nrequests.post(u, data=d)", ("network", 2, "requests.post")),
        ("import httpx\nhttpx.get(u)", ("network", 2, "httpx.get")),
        ("import torch\ntorch.hub.load('r', 'm')", ("network", 2, "torch.hub.load")),
        # process
        ("import subprocess\nsubprocess.run(['ls'])", ("process", 2, "subprocess.run")),
        ("import os\nos.system('ls')", ("process", 2, "os.system")),
        ("import os\nos.popen('ls')", ("process", 2, "os.popen")),
        ("import os\nos.execv('/bin/sh', [])", ("process", 2, "os.execv")),
        ("import os\nos.fork()", ("process", 2, "os.fork")),
        ("import pty\npty.spawn('/bin/sh')", ("process", 2, "pty.spawn")),
        ("import multiprocessing\nmultiprocessing.Process(target=f)", ("process", 2, "multiprocessing.Process")),
        # environment
        ("import os\nkey = os.environ['SERVER_PRIVATE_KEY']", ("environment", 2, "os.environ")),
        ("import os\nos.getenv('SERVER_PRIVATE_KEY')", ("environment", 2, "os.getenv")),
        ("import os\nos.putenv('A', 'b')", ("environment", 2, "os.putenv")),
        # dynamic code
        ("exec(payload)", ("dynamic-code", 1, "builtins.exec")),
        ("eval(payload)", ("dynamic-code", 1, "builtins.eval")),
        ("compile(payload, 'x', 'exec')", ("dynamic-code", 1, "builtins.compile")),
        ("m = __import__(name)", ("dynamic-code", 1, "builtins.__import__")),
        ("import importlib\nimportlib.import_module(name)", ("dynamic-code", 2, "importlib.import_module")),
        ("getattr(model, name)", ("dynamic-code", 1, "builtins.getattr")),
        ("g = globals()", ("dynamic-code", 1, "builtins.globals")),
        ("l = locals()", ("dynamic-code", 1, "builtins.locals")),
        ("v = vars(model)", ("dynamic-code", 1, "builtins.vars")),
        ("setattr(model, 'forward', f)", ("dynamic-code", 1, "builtins.setattr")),
        ("delattr(model, 'hook')", ("dynamic-code", 1, "builtins.delattr")),
        ("import pickle\npickle.loads(blob)", ("dynamic-code", 2, "pickle.loads")),
        ("import marshal\nmarshal.loads(blob)", ("dynamic-code", 2, "marshal.loads")),
        ("import dill\ndill.loads(blob)", ("dynamic-code", 2, "dill.loads")),
        ("import ctypes\nctypes.CDLL('libc.so.6')", ("dynamic-code", 2, "ctypes.CDLL")),
        ("import torch\ntorch.load('w.pt')", ("dynamic-code", 2, "torch.load")),
        ("from transformers import AutoModel\nAutoModel.from_pretrained(p, trust_remote_code=True)",
         ("dynamic-code", 2, "trust_remote_code")),
        ("import numpy as np\nnp.load('a.npy', allow_pickle=True)", ("dynamic-code", 2, "numpy.load")),
        ("import typing\ntyping.get_type_hints(f)", ("dynamic-code", 2, "typing.get_type_hints")),
        # dunder
        ("x = ().__class__", ("dunder", 1, "__class__")),
        ("object.__subclasses__()", ("dunder", 1, "__subclasses__")),
        ("g = f.__globals__", ("dunder", 1, "__globals__")),
        ("b = __builtins__", ("dunder", 1, "__builtins__")),
        ("d = model.__dict__", ("dunder", 1, "__dict__")),
        ("g = frame.f_back.f_globals", ("dunder", 1, "f_globals")),
        ("'{0.__init__.__globals__}'.format(f)", ("dunder", 1, "__globals__")),
    ],
)
def test_each_category_is_caught(source: str, expected: tuple[str, int, str]) -> None:
    # Execute
    review = review_code(source)

    # Assert
    assert expected in hits(review)
    assert review.verdict == "flagged"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import os", ("import", 1, "os")),
        ("import sys", ("import", 1, "sys")),
        ("from syft import client", ("import", 1, "syft")),
        ("import datasites.review", ("import", 1, "datasites.review")),
        ("from . import helpers", ("import", 1, ".")),
        ("from torch import *", ("import", 1, "torch.*")),
    ],
)
def test_imports_outside_the_allowed_set_are_flagged(source: str, expected: tuple[str, int, str]) -> None:
    assert hits(review_code(source)) >= {expected}


# --- evasions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import os as o\nsecret = o.environ['SERVER_PRIVATE_KEY']", ("environment", 2, "os.environ")),
        ("from os import environ as e\nsecret = e['SERVER_PRIVATE_KEY']", ("environment", 2, "os.environ")),
        ("from os import getenv as g\ng('K')", ("environment", 2, "os.getenv")),
        ("from subprocess import *\nrun(['sh'])", ("process", 2, "subprocess.run")),
        ("from subprocess import *\nrun(['sh'])", ("process", 1, "subprocess")),
        ("__import__('os').system('sh')", ("process", 1, "os.system")),
        ("import importlib as il\nil.import_module('os').environ", ("environment", 2, "os.environ")),
        ("from importlib import import_module\nimport_module('subprocess').run(['sh'])",
         ("process", 2, "subprocess.run")),
        ("import os\ngetattr(os, 'environ')", ("environment", 2, "os.environ")),
        ("getattr(__import__('os'), 'system')('sh')", ("process", 1, "os.system")),
        ("import os\nshell = os\nshell.system('sh')", ("process", 3, "os.system")),
        ("import os\na, b = os, 1\na.popen('sh')", ("process", 3, "os.popen")),
        ("import os\nrun = os.system\nrun('sh')", ("process", 3, "os.system")),
        ("import builtins as b\nb.exec(code)", ("dynamic-code", 2, "builtins.exec")),
        ("run = eval\nrun(code)", ("dynamic-code", 2, "builtins.eval")),
        ("import sys\nsys.modules['os'].environ", ("environment", 2, "os.environ")),
        ("import torch\ntorch.serialization.os.system('sh')", ("process", 2, "os.system")),
        ("import numpy as np\nnp.lib.npyio.os.environ", ("environment", 2, "os.environ")),
        ("import os.path as osp\nosp.exists('/data')", ("file", 2, "os.path.exists")),
        ("def steal(module):\n    return module.environ", ("environment", 2, ".environ")),
        ("def f(p):\n    p.write_text('x')", ("file", 2, ".write_text")),
        ("fn = getattr\nfn(model, 'x')", ("dynamic-code", 1, "builtins.getattr")),
        ("getattr(model, '__cla' + 'ss__')", ("dynamic-code", 1, "builtins.getattr")),
        ("getattr(model, '__class__')", ("dunder", 1, "__class__")),
        ("__import__('os.path').system('sh')", ("process", 1, "os.system")),
        ("AutoModel.from_pretrained(p, **{'trust_remote_code': True})", ("dynamic-code", 1, "trust_remote_code")),
        ("from os import __builtins__", ("dunder", 1, "__builtins__")),
    ],
)
def test_aliasing_does_not_evade_the_review(source: str, expected: tuple[str, int, str]) -> None:
    # Execute
    review = review_code(source)

    # Assert
    assert expected in hits(review)


def test_a_module_reached_through_an_allowed_package_names_the_path() -> None:
    # Execute
    review = review_code("import torch\ntorch.serialization.os.system('sh')")

    # Assert
    assert review.findings == (
        Finding(
            Category.PROCESS,
            2,
            "torch.serialization.os.system('sh')",
            "os.system: starts, replaces or signals processes (reached through torch.serialization)",
        ),
    )


def test_literal_getattr_and_ordinary_dunders_are_not_flagged() -> None:
    # Prepare
    source = "import torch\nclass M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n" \
             "w = getattr(torch.nn, 'Linear')\nif __name__ == '__main__':\n    pass\n"

    # Execute
    review = review_code(source)

    # Assert
    assert review.findings == ()


def test_weights_only_torch_load_is_still_file_access_but_not_unpickling() -> None:
    # Execute
    review = review_code("import torch\nstate = torch.load('w.pt', weights_only=True)")

    # Assert
    assert hits(review) == {("file", 2, "torch.load")}


def test_imports_are_listed_in_source_order_across_nested_scopes() -> None:
    # Prepare
    source = "def f():\n    import torch\n    def g():\n        import math\n    import numpy\nimport torch.nn\n"

    # Execute
    review = review_code(source)

    # Assert
    assert review.imports == ("torch", "math", "numpy", "torch.nn")


def test_snippets_follow_python_line_numbering_not_str_splitlines() -> None:
    # Prepare: \u2028 and \f inside a string literal are not line breaks for Python
    source = "note = 'a\u2028b\fc'\nimport os\n"

    # Execute
    review = review_code(source)

    # Assert
    assert review.findings[0].line == 2
    assert review.findings[0].snippet == "import os"


# --- the result object --------------------------------------------------------------------------


def test_findings_carry_the_line_and_the_stripped_source_line() -> None:
    # Execute
    review = review_code("def f():\n    import os as o\n    return o.environ['K']\n")

    # Assert
    assert review.imports == ("os",)
    assert review.findings == (
        Finding(Category.IMPORT, 2, "import os as o", "os: 'os' is not one of the allowed packages"),
        Finding(
            Category.ENVIRONMENT,
            3,
            "return o.environ['K']",
            "os.environ: reads or changes environment variables, which on the server include its private key",
        ),
    )


def test_render_text_lists_verdict_hash_imports_and_each_finding() -> None:
    # Prepare
    source = "import os\nos.system('sh')\n"
    review = review_code(source)

    # Execute
    text = review.render_text()

    # Assert
    assert text.splitlines() == [
        "code review: FLAGGED (2 findings)",
        f"code sha256: {code_hash(source)}",
        "imports:     os",
        "  line 1    import        os: 'os' is not one of the allowed packages",
        "            | import os",
        "  line 2    process       os.system: starts, replaces or signals processes",
        "            | os.system('sh')",
    ]


def test_code_review_is_frozen_and_its_verdict_must_match_its_findings() -> None:
    # Prepare
    review = review_code("x = 1\n")

    # Execute / Assert
    with pytest.raises(FrozenInstanceError):
        review.verdict = "flagged"  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"verdict must be 'clean' with 0 findings, got 'flagged'"):
        CodeReview(code_sha256=review.code_sha256, imports=(), findings=(), verdict="flagged")


def test_a_syntax_error_is_reported_with_its_position() -> None:
    with pytest.raises(CodeReviewError, match=r"does not parse: invalid syntax at line 1, column 7; it cannot be"):
        review_code("def f(:\n    pass\n")


def test_nul_bytes_are_reported_as_unparsable() -> None:
    with pytest.raises(CodeReviewError, match=r"does not parse: source code string cannot contain null bytes"):
        review_code("x = 1\x00\n")


def test_source_must_be_a_string() -> None:
    with pytest.raises(TypeError, match=r"source must be str, got bytes"):
        review_code(b"x = 1")  # type: ignore[arg-type]


# --- the canonical hash -------------------------------------------------------------------------


def test_code_hash_is_sha256_of_the_utf8_source() -> None:
    # Prepare
    source = "def f():\n    return 'é'\n"

    # Execute / Assert
    assert code_hash(source) == hashlib.sha256(source.encode("utf-8")).hexdigest()


def test_code_hash_changes_when_one_character_changes() -> None:
    # Prepare
    changed = CLEAN_TRAINING_FUNCTION.replace("hidden_size=32", "hidden_size=33")

    # Execute / Assert
    assert changed != CLEAN_TRAINING_FUNCTION
    assert code_hash(changed) != code_hash(CLEAN_TRAINING_FUNCTION)


@pytest.mark.parametrize(
    "variant",
    ["def f():\n    return 1 \n", "def f():\n\treturn 1\n", "def f():\n    return 1", "# c\ndef f():\n    return 1\n"],
)
def test_code_hash_does_not_normalise_whitespace_or_comments(variant: str) -> None:
    assert code_hash(variant) != code_hash("def f():\n    return 1\n")


def test_code_hash_treats_crlf_and_cr_line_endings_as_lf() -> None:
    # Prepare
    unix = "def f():\n    return 1\n"

    # Execute / Assert
    assert code_hash(unix.replace("\n", "\r\n")) == code_hash(unix)
    assert code_hash(unix.replace("\n", "\r")) == code_hash(unix)


def test_printable_shows_terminal_escapes_instead_of_obeying_them() -> None:
    from policies.review import printable

    shown = printable("line one\n\x1b[2J\x1b[Hfake review\tok\u202egnp.exe\x07")

    assert shown == "line one\n\\x1b[2J\\x1b[Hfake review\tok\\u202egnp.exe\\x07"


# --- the listing an admin reads: long numeric literals summarised ------------------------------------------


def _plan_source(centre: list[float], weight: list[list[float]]) -> str:
    from policies.submission import render_literal

    plan = {"run_id": "run-0123456789ab", "model": {"name": None, "centre": centre,
                                                    "head_init": {"weight": weight, "bias": [-0.25, 0.25]}},
            "dp": {"rounds": 2}, "roster": [["site-a", "ab" * 32]]}
    return render_literal(plan)


CENTRE = [(-1) ** i * (0.125 + i / 1024) for i in range(48)]  # negative values parse as a unary minus
WEIGHT = [[i / 64 - 0.5 for i in range(48)], [0.5 - i / 64 for i in range(48)]]


def _digest(values: object) -> str:
    import json

    return hashlib.sha256(json.dumps(values, separators=(",", ":")).encode("utf-8")).hexdigest()[:32]


def test_the_listing_summarises_the_plans_long_vectors_by_shape_norm_and_digest() -> None:
    # Prepare
    import math

    from policies.review_render import render_listing, summarise_vectors

    source = _plan_source(CENTRE, WEIGHT)

    # Execute
    centre, weight = summarise_vectors(source)
    listing, table = render_listing(source)

    # Assert: each vector stands as one line of the listing, described again under it with its origin
    assert (centre.where, centre.shape, centre.digest) == ("plan['model']['centre']", (48,), _digest(CENTRE))
    assert centre.norm == pytest.approx(math.sqrt(sum(v * v for v in CENTRE)), rel=1e-12)
    assert (weight.where, weight.shape, weight.digest) == ("plan['model']['head_init']['weight']", (2, 48),
                                                           _digest(WEIGHT))
    assert len(source.splitlines()) > 140 and len(listing) < 20
    assert f"'centre': <48 numbers, L2 norm {centre.norm:.6g}, sha256 {centre.digest}>," in "\n".join(listing)
    assert f"'weight': <2 x 48 numbers, L2 norm {weight.norm:.6g}, sha256 {weight.digest}>}}," in "\n".join(listing)
    assert "'bias': [-0.25, 0.25]," in "\n".join(listing)  # short lists stay as they are
    assert "0.125" not in "\n".join(listing) and "`fedsite admin show --full REQUEST`" in table[0]
    assert table[2] == (f"  plan['model']['centre'] (lines {centre.span[0]}-{centre.span[2]}): 48 numbers, "
                        f"L2 norm {centre.norm:.6g}, sha256 {centre.digest}")
    assert "public texts" in table[3] and "the plan records neither the texts nor their digest" in table[3]


def test_the_full_listing_is_the_exact_source_and_the_hash_is_of_the_exact_source() -> None:
    # Prepare
    from policies.review_render import render_listing

    source = _plan_source(CENTRE, WEIGHT)

    # Execute
    listing, table = render_listing(source, full=True)

    # Assert
    assert "\n".join(listing) == source.rstrip() and table == []
    assert review_code(source).code_sha256 == hashlib.sha256(source.encode("utf-8")).hexdigest()


@pytest.mark.parametrize(
    "literal",
    ["[1, 2, 3, 4, 5, 6, 7, 8]", "[1, 2, 'three', 4, 5, 6, 7, 8, 9]", "[x, 2, 3, 4, 5, 6, 7, 8, 9]",
     "[[1, 2, 3, 4, 5], [6, 7, 8, 9]]", "[True, 2, 3, 4, 5, 6, 7, 8, 9]", "[f(1), 2, 3, 4, 5, 6, 7, 8, 9]"],
)
def test_only_long_rectangular_literals_of_numbers_are_summarised(literal: str) -> None:
    from policies.review_render import render_listing, summarise_vectors

    source = f"def f(x):\n    v = {literal}\n    return v\n"

    assert summarise_vectors(source) == ()
    assert render_listing(source) == (source.rstrip().split("\n"), [])


def test_a_literal_after_non_ascii_text_on_its_line_is_spliced_at_the_right_place() -> None:
    from policies.review_render import render_listing

    source = "def f():\n    é = 'ü'; v = [0, 1, 2, 3, 4, 5, 6, 7, 8]; return v\n"

    listing, _ = render_listing(source)

    assert listing[1].startswith("    é = 'ü'; v = <9 numbers, L2 norm ") and listing[1].endswith(">; return v")


def test_unparsable_code_is_listed_in_full() -> None:
    from policies.review_render import render_listing

    source = "def f(:\n    v = [0, 1, 2, 3, 4, 5, 6, 7, 8]\n"

    assert render_listing(source) == (source.rstrip().split("\n"), [])


def test_the_admins_review_summarises_vectors_unless_full() -> None:
    # Prepare
    from datasites.review_queue import RequestSummary, ReviewReport

    source = _plan_source(CENTRE, WEIGHT)
    summary = RequestSummary(request_id="0123456789abcdef0123456789abcdef", function="fedsite_run_0123456789ab",
                             researcher="0" * 32, researcher_email="rita@uni.org", status="pending")
    report = ReviewReport(summary, source, review_code(source), None, None, None, None, None)

    # Execute
    short, full = report.render_text(), report.render_text(full=True)

    # Assert
    assert f"sha256 {_digest(CENTRE)}" in short and "0.125" not in short
    assert source.rstrip() in full and "summarised above" not in full
    assert f"code sha256: {code_hash(source)}" in short and f"code sha256: {code_hash(source)}" in full


def test_deeply_nested_code_is_listed_and_code_too_deep_to_parse_is_refused_not_crashed_on() -> None:
    from policies.review_render import render_listing

    deep = "def f():\n    x = " + "+".join(["1"] * 2000) + "\n"
    too_deep = "def f():\n    x = " + "+".join(["1"] * 50_000) + "\n"

    assert render_listing(deep) == (deep.rstrip().split("\n"), [])
    assert render_listing(too_deep) == (too_deep.rstrip().split("\n"), [])
    with pytest.raises(CodeReviewError, match=r"does not parse: it is nested too deeply to parse"):
        review_code(too_deep)


def test_fedsite_admin_show_takes_full_and_the_demo_out_defaults_to_an_ignored_new_folder() -> None:
    import re

    from fedsite.cli import build_parser
    from fedsite.demo import default_out

    parser = build_parser()

    assert parser.parse_args(["admin", "show", "abcdef12", "--full", "--data-dir", "d"]).full is True
    assert parser.parse_args(["admin", "show", "abcdef12", "--data-dir", "d"]).full is False
    assert parser.parse_args(["demo", "--quick"]).out is None
    assert re.fullmatch(r"runs/demo-\d{8}T\d{6}Z", default_out().as_posix())  # /runs/ is in .gitignore


def test_the_listing_visits_a_summarised_matrix_once_not_row_by_row() -> None:
    # A submission of many numeric rows must not cost the admin's review time quadratic in the rows
    import ast

    from policies.review_render import _long_numeric, _walk, summarise_vectors

    rows = 2_000
    source = "junk = [" + ", ".join("[1.0, 2.0, 3.0, 4.0, 5.0]" for _ in range(rows)) + "]\n"
    tree = ast.parse(source)

    visited = sum(1 for _ in _walk(tree, stop=_long_numeric))
    every = sum(1 for _ in ast.walk(tree))

    assert visited < 10 < every  # the module, the assignment, its target and the one matrix; not its rows
    (summary,) = summarise_vectors(source)
    assert summary.shape == (rows, 5)
