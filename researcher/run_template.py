"""The commented ``run.toml`` that ``fedsite run init`` writes (by hand: no TOML writer dependency).

``render_run_toml`` fills in the sites it is given; without them it writes two placeholder sites whose
``identity_key`` the researcher must replace (the file then refuses to load until they do, naming the key).
``quick`` writes a tiny random model and a two-round plan: a smoke test of the sites, not a real run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_PASSWORD_ENV = "FEDSITE_RESEARCHER_PASSWORD"  # where run.toml reads the password from unless it says otherwise


@dataclass(frozen=True)
class TemplateSite:
    name: str
    url: str  # http(s)://HOST:PORT
    identity_key: str


PLACEHOLDER_KEY = "REPLACE-with-the-64-hex-digits-that-fedsite-admin-identity-prints"
_EXAMPLE_SITES = (TemplateSite("site-a", "https://site-a.example.org:8443", PLACEHOLDER_KEY),
                  TemplateSite("site-b", "https://site-b.example.org:8443", PLACEHOLDER_KEY))

_HEADER = """\
# A Fedsite federated run: `fedsite run submit`, then `status`, `train`, `report` read this file.
# Relative paths are read from this file's folder. The password never goes here: name an environment
# variable (password_env) or a private file (password_file) that holds it.

[run]
output_dir = {output_dir}  # run state: run id, plan, submitted function, checkpoints, report.json/.png
dataset = "imdb"           # the dataset name every site uploaded (`fedsite admin upload --dataset`)
# threshold = 2            # sites that must finish a round's secure sum (2..number of sites; default a majority)

[researcher]               # your login, the same at every site unless a [[sites]] table overrides it
email = {email}
password_env = "{env}"  # or: password_file = "~/.fedsite/password" (first line; keep it chmod 600)

# One [[sites]] table per datasite, as its admin handed it over. identity_key is the site's Ed25519 public
# key that `fedsite admin identity` prints: compare it with the admin out of band; every site refuses a plan
# whose roster pins another key for any site. Optional per site: email, password_env or password_file, and
# ca = "site-a-ca.pem" (the CA that signed an https site's certificate).
"""

_SITE = """
[[sites]]
name = {name}
url = {url}  # http(s)://HOST:PORT
identity_key = {key}
"""

_MODEL = """
[model]                    # what every site builds from its own installed copy (nothing is downloaded)
name = "all-MiniLM-L6-v2"  # a Hugging Face BERT-family name; or drop it and give [model.tiny] (tests only)
pooling = "mean"           # "mean" (masked mean of the last layer; needed by [public] start) or "cls"
dropout = 0.0              # every dropout probability of the model, in [0, 1); drop the key to keep the checkpoint's
seed = 0                   # seeds the weights that are not loaded (LoRA factors, a new head), the same everywhere

[model.trainable]          # which parameters train (the rest stay frozen and are never sent)
kind = "lora"              # "lora" (adapters), "head" (classifier only), "top_k" (last top_k layers + head) or "full"
lora_rank = 8              # with lora: the adapters' rank; also lora_alpha, lora_dropout, lora_targets
"""

_TINY_MODEL = """
[model]                    # a tiny random BERT: a smoke test of the sites, it learns little
pooling = "mean"           # "mean" (needed by [public] start) or "cls"
seed = 0                   # seeds every weight, the same at every site

[model.tiny]               # a random model of this shape (instead of name = "all-MiniLM-L6-v2")
hidden_size = 32
layers = 2
heads = 2
max_length = 64

[model.trainable]
kind = "lora"              # "lora", "head", "top_k" or "full"
lora_rank = 4
"""

_DP = """
[dp]                       # DP-SGD at every site; each site calibrates its noise to reach target_epsilon
rounds = {rounds}                 # federated rounds (>= 1)
local_steps = {local_steps}           # noisy optimizer steps per round at each site (>= 1)
expected_batch_size = {batch}   # Poisson sampling: records per step on average (<= a site's records)
max_physical_batch_size = 32  # memory bound on one forward/backward (>= 1); does not change the privacy
clip_norm = 1.0            # per-record gradient L2 bound C (> 0)
target_epsilon = 8.0       # epsilon of the whole run at delta (> 0); each site refuses more than its budget
# noise_multiplier = 1.1   # instead of target_epsilon: a fixed sigma
delta = 1e-5               # in (0, 1) and below 1 / (a site's records)
learning_rate = {lr}       # AdamW step size (> 0)
optimizer = "adamw"        # "adamw" or "sgd"
max_length = {max_length}           # tokens per review after truncation (>= 2)
tail_tokens = {tail}          # of a longer review also keep its last tail_tokens tokens (0..max_length-2)
accountant = "prv"         # "prv" or "rdp"
"""

_REST = """
[public]                   # public, unlabelled texts (never a site's data; no privacy cost)
imdb_test_reviews = {public}    # take this many IMDB test reviews (seed 1, apart from the evaluated ones); or
# file = "public.txt"       # one text per line, UTF-8; or
# texts = ["A public text.", "Another one."]
start = true               # centre the mean pooling on them and start the classifier from label prompts
calibrate = true           # after each round shift the classifier's bias so positive_share of them are positive
positive_share = 0.5       # the population's share of label 1, in (0, 1)

[evaluation]               # the public test data the global model is scored on after every round
imdb = {imdb}  # a folder holding IMDB's test.parquet
test_size = {test_size}            # reviews of the test split (>= 1)
test_seed = 0              # which reviews
"""


def _quoted(text: str) -> str:
    return json.dumps(text)  # a JSON string is a TOML basic string


def render_run_toml(*, sites: Sequence[TemplateSite] = (), imdb: str = "data/imdb", email: str = "you@example.org",
                    output_dir: str = "fedsite-run", quick: bool = False) -> str:
    """The commented run.toml; with ``sites`` it loads as is (``load_run_config``)."""
    text = _HEADER.format(output_dir=_quoted(output_dir), email=_quoted(email), env=DEFAULT_PASSWORD_ENV)
    for site in sites or _EXAMPLE_SITES:
        text += _SITE.format(name=_quoted(site.name), url=_quoted(site.url), key=_quoted(site.identity_key))
    text += _TINY_MODEL if quick else _MODEL
    size = ({"rounds": 2, "local_steps": 2, "batch": 16, "lr": "5e-3", "max_length": 64, "tail": 0} if quick else
            {"rounds": 3, "local_steps": 12, "batch": 64, "lr": "1e-2", "max_length": 128, "tail": 94})
    text += _DP.format(**size)
    text += _REST.format(public=64 if quick else 256, imdb=_quoted(imdb), test_size=100 if quick else 500)
    return text
