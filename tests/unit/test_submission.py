"""The canonical round function, the federated plan parser and the runtime's input checks."""

from __future__ import annotations

import ast
import base64
import copy
import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policies.approvals import ExecutionRefusedError
from policies.contracts import encode_vector
from policies.federated_plan import FederatedPlan, FederatedPlanError
from policies.site_runtime import SiteRefusal, decode_global_model, run_stage
from policies.submission import (
    ROUND_FUNCTION_TEMPLATE,
    SubmissionError,
    canonical_plan,
    function_name,
    render_round_function,
    runtime_modules,
)

pytestmark = pytest.mark.unit


def _key() -> str:
    return Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()


def make_raw_plan(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "format": 1, "run_id": "run-0123456789ab", "dataset": "imdb",
        "model": {"name": None, "tiny": {"hidden_size": 32}, "trainable": {"kind": "lora"}, "seed": 0},
        "dp": {"clip_norm": 1.0, "delta": 1e-5, "expected_batch_size": 16, "local_steps": 2, "rounds": 2,
               "target_epsilon": 3.0},
        "secure_sum": {"vector_length": 10, "clip": 0.5, "quantisation_bits": 24, "threshold": 2,
                       "modulus_bits": 32, "neighbourhood_size": None},
        "roster": [["site-a", _key()], ["site-b", _key()], ["site-c", _key()]],
    }
    raw.update(overrides)
    return raw


def test_rendered_function_round_trips_its_plan() -> None:
    plan = FederatedPlan.parse(make_raw_plan())

    source = render_round_function(plan)

    assert source.startswith(f"def {function_name(plan.run_id)}(data, stage, message):")
    assert canonical_plan(source) == plan.to_dict()
    assert canonical_plan("@sy.syft_function(input_policy=x)\n" + source) == plan.to_dict()
    assert FederatedPlan.parse(canonical_plan(source)) == plan


def test_the_typed_plan_serialises_to_its_canonical_literal_and_back_exactly() -> None:
    head_init = {"weight": [[-0.5, 0.25], [0.5, -0.25]], "bias": [0.125, -0.125]}
    for model in (make_raw_plan()["model"],
                  {"name": "all-MiniLM-L6-v2", "trainable": {"kind": "top_k", "top_k": 1}, "pooling": "cls"},
                  {"name": None, "tiny": {"hidden_size": 2}, "trainable": {"kind": "lora", "lora_targets": ["key"]},
                   "centre": [0.5, -1.5], "head_init": head_init, "dropout": 0.0}):
        plan = FederatedPlan.parse(make_raw_plan(model=model))

        canonical = plan.to_dict()

        assert FederatedPlan.parse(canonical) == plan  # back to an equal typed plan
        assert FederatedPlan.parse(canonical).to_dict() == canonical  # and to the same literal, exactly
        assert json.loads(json.dumps(canonical)) == canonical  # plain JSON, no tuples or bytes
        assert FederatedPlan.parse(canonical).digest() == plan.digest()
    # Defaults written out or left implicit are the same plan with the same digest
    implicit = FederatedPlan.parse(make_raw_plan())
    explicit = FederatedPlan.parse({**make_raw_plan(roster=implicit.to_dict()["roster"]),
                                    "model": implicit.model.to_dict()})
    assert explicit == implicit and explicit.digest() == implicit.digest()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.replace("    return run_stage", "    import os\n    return run_stage"), "not the canonical"),
        (lambda s: s.replace("make_model=make_model)", "make_model=make_model, extra=1)"), "not the canonical"),
        (lambda s: s.replace("(data, stage, message)", "(data, stage, message, x=1)"), "not the canonical"),
        (lambda s: ROUND_FUNCTION_TEMPLATE.format(name="fedsite_run_0123456789ab", plan="dict(run_id='run-0')"),
         "the plan must be a literal"),
        (lambda s: s + "\nx = 1\n", "exactly one function definition"),
        (lambda s: s.replace("    plan = ", "    other = "), "must start with `plan = {...}`"),
        (lambda s: s.replace("def ", "def  (", 1), "does not parse"),
        # what an admin's terminal would interpret: an escape sequence redrawing the review, a bidi override
        (lambda s: s + "    # \x1b[2J\x1b[H plan: 1 round, no problems\n", "characters outside printable ASCII"),
        (lambda s: s.replace("    return run_stage", "    return run_stage  # harmless?"), "holds a comment"),
        (lambda s: s + "    # quiet\n", "holds a comment"),
        (lambda s: s.replace("'imdb'", "'imdb\u202e'"), "characters outside printable ASCII"),
        (lambda s: s.replace("'imdb'", "'imdb\\x1b[8m'"), r"plan\['dataset'\] holds a non-printable character"),
    ],
)
def test_anything_but_the_canonical_function_is_refused(edit: Any, message: str) -> None:
    source = edit(render_round_function(FederatedPlan.parse(make_raw_plan())))

    with pytest.raises(SubmissionError, match=message):
        canonical_plan(source)


def test_the_runtime_a_site_preloads_is_what_the_round_function_imports() -> None:
    rendered = ast.parse(render_round_function(FederatedPlan.parse(make_raw_plan())))
    imported = tuple(node.module for node in ast.walk(rendered) if isinstance(node, ast.ImportFrom))
    assert runtime_modules() == imported == ("policies.site_runtime", "models")
    # In a fresh interpreter (this one has imported everything already): loading brings in the ML stack.
    probe = ("import sys; from policies.submission import load_runtime; assert 'torch' not in sys.modules; "
             "load_runtime(); print(sorted(m for m in ('torch', 'opacus', 'peft', 'transformers', "
             "'policies.site_runtime', 'models.build', 'researcher') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    assert loaded.stdout.strip() == str(sorted(["torch", "opacus", "peft", "transformers", "policies.site_runtime",
                                                "models.build"]))


def test_a_renamed_function_is_not_canonical() -> None:
    source = render_round_function(FederatedPlan.parse(make_raw_plan())).replace("fedsite_run_0123456789ab", "fedsite_run_ffffffffffff", 1)

    with pytest.raises(SubmissionError, match="not the canonical"):
        canonical_plan(source)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 2}, r"plan\['format'\] must be 1"),
        ({"run_id": "run-XYZ"}, r"plan\['run_id'\] must look like"),
        ({"dataset": "../etc"}, r"plan\['dataset'\] '../etc' is not a dataset name"),
        ({"extra": 1}, r"unknown fields \['extra'\]"),
        ({"roster": [["site-a", "00" * 31], ["site-b", _key()]]}, r"invalid plan: .*must be 32 raw Ed25519 bytes"),
        ({"roster": [["site-a", _key()]]}, r"invalid plan: a roster needs a tuple of at least 2 sites"),
        ({"model": {"name": "x", "tiny": {"hidden_size": 4}, "trainable": {"kind": "lora"}}},
         r"exactly one of 'name'"),
        # a path would make the site load any model directory on its disk, and answer whether it exists
        ({"model": {"name": "/home/owner/private-model", "trainable": {"kind": "lora"}}},
         r"plan\['model'\]\['name'\] '/home/owner/private-model' is not a model name"),
        ({"model": {"name": "models/../../secrets", "trainable": {"kind": "lora"}}}, r"is not a model name"),
        # the admin's review builds the model: a huge one would exhaust its machine
        ({"model": {"name": None, "tiny": {"vocab_size": 10**9}, "trainable": {"kind": "lora"}}},
         r"plan\['model'\]\['tiny'\] must map some of .* to ints in 1\.\."),
        ({"model": {"name": None, "tiny": {"vocab_size": 250_000, "hidden_size": 4096, "layers": 48},
                    "trainable": {"kind": "lora"}}},
         r"plan\['model'\]\['tiny'\] makes a model of about 7,[0-9,]+ parameters, over 50,000,000"),
        ({"model": {"name": "x", "trainable": {"kind": "lora"}, "pooling": "max"}},
         r"plan\['model'\]\['pooling'\] must be 'mean' or 'cls', got 'max'"),
        ({"model": {"name": "x", "trainable": {"kind": "lora"}, "centre": [0.1, float("nan")]}},
         r"plan\['model'\]\['centre'\] must be a list of 1 to 8192 finite floats"),
        ({"model": {"name": "x", "trainable": {"kind": "lora"}, "pooling": "cls", "centre": [0.1]}},
         r"applies to pooling 'mean' only"),
        ({"model": {"name": "x", "trainable": {"kind": "lora"}, "head_init": {"weight": [[0.1], [0.2]]}}},
         r"plan\['model'\]\['head_init'\] must be a mapping with 'weight' and 'bias'"),
        ({"model": {"name": "x", "trainable": {"kind": "lora"},
                    "head_init": {"weight": [[0.1, 0.2], [0.3]], "bias": [0.0, 0.0]}}},
         r"\['weight'\] must be 2 to 64 rows \(one per label\) of equally many finite floats"),
        ({"model": {"name": "x", "trainable": {"kind": "lora"},
                    "head_init": {"weight": [[0.1], [float("inf")]], "bias": [0.0, 0.0]}}},
         r"\['weight'\] must be 2 to 64 rows"),
        ({"model": {"name": "x", "trainable": {"kind": "lora"},
                    "head_init": {"weight": [[0.1], [0.2]], "bias": [0.0]}}},
         r"\['bias'\] must be one finite float per weight row"),
        ({"model": {"name": "x", "trainable": {"kind": "lora"}, "pooling": "cls",
                    "head_init": {"weight": [[0.1], [0.2]], "bias": [0.0, 0.0]}}},
         r"\['head_init'\] applies to pooling 'mean' only"),
        ({"model": {"name": "x", "trainable": {"kind": "lora"}, "dropout": 1.0}},
         r"plan\['model'\]\['dropout'\] must be a float in \[0, 1\) \(e.g. 0.0\), got 1.0"),
        ({"model": {"name": "x", "trainable": {"kind": "lora"}, "dropout": 0}},
         r"plan\['model'\]\['dropout'\] must be a float in \[0, 1\)"),
        # the trainable set is validated with the plan (models.spec), not first when a site builds the model
        ({"model": {"name": "x", "trainable": {"kind": "prefix"}}},
         r"plan\['model'\]\['trainable'\]: kind must be one of \('full', 'top_k', 'lora', 'head'\), got 'prefix'"),
        ({"model": {"name": "x", "trainable": {"kind": "lora", "lora_targets": "query"}}},
         r"plan\['model'\]\['trainable'\]\['lora_targets'\] must be a list of layer names, got 'query'"),
        ({"model": {"name": "x", "trainable": {"kind": "lora", "lora_rank": 0}}},
         r"plan\['model'\]\['trainable'\]: lora_rank must be an int in 1..1024, got 0"),
    ],
)
def test_bad_plans_name_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(FederatedPlanError, match=message):
        FederatedPlan.parse(make_raw_plan(**change))


def test_a_plan_with_the_default_recipes_start_round_trips_through_the_function() -> None:
    head_init = {"weight": [[-0.5, 0.25], [0.5, -0.25]], "bias": [0.125, -0.125]}
    raw = make_raw_plan(model={"name": None, "tiny": {"hidden_size": 2}, "trainable": {"kind": "lora"}, "seed": 0,
                               "centre": [0.5, -1.5], "head_init": head_init, "dropout": 0.0})

    plan = FederatedPlan.parse(canonical_plan(render_round_function(FederatedPlan.parse(raw))))

    assert plan.model.centre == (0.5, -1.5) and plan.model.head_init == head_init and plan.model.dropout == 0.0


def test_threshold_below_a_majority_is_refused() -> None:
    raw = make_raw_plan()
    raw["secure_sum"] = {**raw["secure_sum"], "threshold": 1}

    with pytest.raises(FederatedPlanError, match=r"threshold"):
        FederatedPlan.parse(raw)


def test_session_ids_are_fixed_by_the_plan() -> None:
    plan = FederatedPlan.parse(make_raw_plan())

    assert plan.session_id(3, 1) == "run-0123456789ab/round-3/attempt-1"
    assert plan.context(3, 1).session_id == plan.session_id(3, 1)


def test_plan_parsing_does_not_mutate_its_input() -> None:
    raw = make_raw_plan()
    before = copy.deepcopy(raw)

    FederatedPlan.parse(raw)

    assert raw == before


def test_vectors_travel_as_exact_little_endian_float32() -> None:
    vector = np.array([0.5, -1.25, 3.0], dtype=np.float32)

    assert np.array_equal(decode_global_model(encode_vector(vector), 3), vector)


@pytest.mark.parametrize(
    ("encoded", "length", "message"),
    [
        (123, 3, r"must be a base64 str, got int"),
        (base64.b64encode(b"\x00" * 8).decode(), 3, r"has 2 values, the plan has 3 trainable parameters"),
        (base64.b64encode(np.array([np.nan], dtype="<f4").tobytes()).decode(), 1, r"NaN or infinite"),
        # weights near float32's limit, aimed at one review's embedding, would make only that review overflow
        (base64.b64encode(np.array([0.5, -2e37], dtype="<f4").tobytes()).decode(), 2,
         r"^the global model has a value beyond \+-10000: no trained weight is that large$"),
    ],
)
def test_bad_global_models_are_refused(encoded: Any, length: int, message: str) -> None:
    with pytest.raises(SiteRefusal, match=message):
        decode_global_model(encoded, length)


def test_the_runtime_refuses_to_run_outside_a_guarded_execution() -> None:
    with pytest.raises(ExecutionRefusedError, match=r"only inside a site-authorised execution"):
        run_stage({"text": ["a"], "label": [1]}, stage="advertise_keys", message={}, plan={}, make_model=lambda: None)  # type: ignore[arg-type,return-value]


def test_the_dry_run_takes_its_one_step_under_an_averaging_plan() -> None:
    # Prepare: a plan that averages both local steps of a round; the mock twin's reviews
    from models import build_from_spec
    from policies.site_runtime import dry_run
    from researcher.fedavg import flatten_trainable

    model_spec = make_raw_plan()["model"]
    length = len(flatten_trainable(build_from_spec(model_spec)[0])[0])
    raw = make_raw_plan(secure_sum={"vector_length": length, "clip": 0.5, "quantisation_bits": 24, "threshold": 2,
                                    "modulus_bits": 32, "neighbourhood_size": None})
    raw["dp"]["average_last_steps"] = 2
    texts, labels = [f"review {i} {'good' if i % 2 else 'bad'}" for i in range(40)], [i % 2 for i in range(40)]

    # Execute
    result = dry_run(texts, labels, plan=FederatedPlan.parse(raw), make_model=lambda: build_from_spec(model_spec))

    # Assert
    assert result.trainable_parameters == length and result.mock_rows == 40


# --- the literal an admin reads is the canonical one (red-team findings on the summarised listing) -------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # a key twice: Python keeps the last value, the listing would show both
        (lambda s: s.replace("'rounds': 2,", "'rounds': 2,\n                   'rounds': 50,", 1),
         r"the plan repeats the key\(s\) 'rounds'"),
        # keys the dict holds as one: 1 and 1.0, two equal tuples
        (lambda s: s.replace("'rounds': 2,", "'rounds': 2, 1: 0, 1.0: 1, ('a', 1): 2, ('a', 1): 3,", 1),
         r"the plan repeats the key\(s\) \('a', 1\), 1:"),
        # a key that cannot be a dict key at all
        (lambda s: s.replace("'rounds': 2,", "'rounds': 2, ['a']: 0,", 1), r"literal cannot be built .*unhashable"),
        # a default left out, an int for a float, a key in capitals: the same typed plan, another literal
        (lambda s: s.replace("'seed': 0,", "", 1), r"not written in its canonical form"),
        (lambda s: s.replace("'clip_norm': 1.0,", "'clip_norm': 1,", 1), r"not written in its canonical form"),
    ],
)
def test_a_plan_not_written_in_canonical_form_is_refused(edit: Any, message: str) -> None:
    plan = FederatedPlan.parse(make_raw_plan())
    source = edit(render_round_function(plan))
    assert source != render_round_function(plan)  # the edit applied

    with pytest.raises(SubmissionError, match=message):
        canonical_plan(source)


def test_a_roster_key_in_capitals_is_refused_as_not_canonical() -> None:
    plan = FederatedPlan.parse(make_raw_plan())
    key = plan.to_dict()["roster"][0][1]
    source = render_round_function(plan).replace(key, key.upper(), 1)

    with pytest.raises(SubmissionError, match=r"not written in its canonical form"):
        canonical_plan(source)


def test_an_oversized_source_is_refused_before_it_is_parsed() -> None:
    from policies.submission import MAX_SOURCE_CHARS

    source = render_round_function(FederatedPlan.parse(make_raw_plan()))
    padded = source.replace("plan = {", "plan = {'junk': [" + "0," * (MAX_SOURCE_CHARS // 2) + "], ", 1)

    with pytest.raises(SubmissionError, match=r"characters, over 16,777,216: no valid plan is that large"):
        canonical_plan(padded)
