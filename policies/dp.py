"""The site's DP-SGD step: one federated round of local training on the private partition.

The researcher supplies the model (and its tokenizer); everything that the privacy guarantee rests
on is here, in code the site installed: Poisson sampling, per-sample clipping, Gaussian noise, the
step count, the accountant and the ledger write. The DP-SGD algorithm is Abadi et al., CCS 2016,
Algorithm 1, as implemented by Opacus (``DPDataLoader``, ``GradSampleModule`` / ghost clipping,
``DPOptimizer``, ``BatchMemoryManager``). Parameters come from a ``CalibratedPlan`` that the site
approved, never from the researcher's function. The noise and the Poisson batches are drawn from
AES-CTR under a key from ``os.urandom`` (``SecureGaussianNoise``, ``SecurePoissonSampler``), never
from a torch generator the researcher's code could seed, unless a plan turns ``secure_mode`` off.

One round (``local_dp_round``):

1. check the model's trainable layers (each must be one whose per-sample gradient is exact);
2. fingerprint the (texts, labels) it was handed; if they are not the private partition the site
   recorded, this is syft's second execution on the mock: return a zero delta marked ``is_mock``
   without training or spending;
3. check the ledger can pay for ``local_steps`` noisy steps (refuse before training otherwise);
4. run exactly ``local_steps`` logical DP-SGD steps, physical batches bounded by BatchMemoryManager;
5. cross-check the steps Opacus's accountant saw against the event; spend it in the ledger (fsync'd);
6. return the delta of the trainable parameters. Only then may anything leave the site.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from policies.accounting import (
    ACCOUNTANTS,
    AccountingError,
    HistoryEntry,
    PrivacyEvent,
    calibrate_noise_multiplier,
    check_accountant,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    epsilon_of,
)
from policies.fingerprint import partition_fingerprint
from policies.ledger import BudgetExceededError, LedgerRecord, PrivacyLedger

# "ghost": Opacus ghost clipping (Li et al., "Large Language Models Can Be Strong Differentially
# Private Learners", ICLR 2022; Bu et al. 2023): per-sample gradient *norms* from activations and
# output gradients, then a second backward pass on the clipped loss, so per-sample gradients of
# embeddings and linear layers are never materialised. "hooks": Opacus's per-sample gradients
# (Goodfellow 2015 trick per layer), materialised and clipped. Both are exact. "hooks" is the
# default: with LoRA + head it ran at 0.94x the non-private throughput (MiniLM, H200, batch 128,
# fp32), ghost at 0.59x; ghost's advantage is memory when every parameter trains (README).
CLIPPING_MODES = ("ghost", "hooks")
DEFAULT_CLIPPING_MODE = "hooks"  # chosen from bench/dp_throughput.py (README: "DP throughput")
OPTIMIZERS = ("adamw", "sgd")


class DPPlanError(ValueError):
    """A DP plan parameter is out of range or inconsistent with the data; nothing was trained."""


class UnsupportedLayerError(DPPlanError):
    """A trainable layer has no exact per-sample gradient in the chosen clipping mode."""


def _plan_number(name: str, value: object, *, integer: bool = False) -> float:
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise DPPlanError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):  # type: ignore[arg-type]
        raise DPPlanError(f"{name} must be finite, got {value}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True, kw_only=True)
class DPPlan:
    """What a researcher asks a site to run, validated in full before anything trains.

    Exactly one of ``target_epsilon`` and ``noise_multiplier`` is given. The site turns a plan into a
    ``CalibratedPlan`` (``calibrate_plan``) at approval time, against its ledger and its data size.
    """

    clip_norm: float  # C: per-sample gradient L2 bound; > 0
    delta: float  # delta of target_epsilon; in (0, 1), and < 1/n_records (checked with the data)
    expected_batch_size: int  # Poisson sampling gives batches of this size on average; 1 <= B <= n_records
    local_steps: int  # noisy optimizer steps per round at the site; >= 1
    rounds: int  # federated rounds of this run; >= 1 (total steps = rounds * local_steps)
    target_epsilon: float | None = None  # epsilon of this whole run (all rounds) at delta; > 0
    noise_multiplier: float | None = None  # sigma, instead of target_epsilon; > 0
    learning_rate: float = 5e-4  # optimizer step size; > 0
    optimizer: str = "adamw"  # "adamw" or "sgd" (post-processing of the noisy gradient either way)
    max_physical_batch_size: int = 128  # memory bound on one forward/backward; >= 1
    max_length: int = 256  # tokens per text after truncation; >= 2
    tail_tokens: int = 0  # of a longer text, keep the last tail_tokens tokens too (see tokenize); [0, max_length-2]
    accountant: str = "prv"  # "prv" (Gopi et al. 2021) or "rdp" (Mironov et al. 2019)
    clipping_mode: str = DEFAULT_CLIPPING_MODE  # "ghost" or "hooks" (see CLIPPING_MODES)
    # noise and Poisson batches from a CSPRNG, summed against floating-point attacks (SecureGaussianNoise);
    # False only for benches and reference runs: torch's generators, and the admin's review flags the plan
    secure_mode: bool = True
    average_last_steps: int = 0  # release the mean of the last k iterates of a round (0: the last one); [0, local_steps]

    def __post_init__(self) -> None:
        clip = _plan_number("clip_norm", self.clip_norm)
        if clip <= 0:
            raise DPPlanError(f"clip_norm must be > 0, got {clip}: pass e.g. clip_norm=1.0")
        try:
            check_delta(self.delta)
            if self.target_epsilon is not None:
                check_epsilon(self.target_epsilon)
            if self.noise_multiplier is not None:
                check_noise_multiplier(self.noise_multiplier)
            check_accountant(self.accountant)
        except AccountingError as exc:
            raise DPPlanError(str(exc)) from exc
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise DPPlanError(
                f"give exactly one of target_epsilon and noise_multiplier, got target_epsilon={self.target_epsilon!r} "
                f"and noise_multiplier={self.noise_multiplier!r}"
            )
        for name, low in (
            ("expected_batch_size", 1),
            ("local_steps", 1),
            ("rounds", 1),
            ("max_physical_batch_size", 1),
            ("max_length", 2),
        ):
            value = _plan_number(name, getattr(self, name), integer=True)
            if value < low:
                raise DPPlanError(f"{name} must be >= {low}, got {value}")
        check_tail_tokens(self.tail_tokens, self.max_length)
        average = _plan_number("average_last_steps", self.average_last_steps, integer=True)
        if not 0 <= average <= self.local_steps:
            raise DPPlanError(
                f"average_last_steps must be in [0, local_steps] = [0, {self.local_steps}], got {average}: "
                f"0 releases the last iterate, {self.local_steps} the mean of all the round's iterates"
            )
        if _plan_number("learning_rate", self.learning_rate) <= 0:
            raise DPPlanError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.optimizer not in OPTIMIZERS:
            raise DPPlanError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.clipping_mode not in CLIPPING_MODES:
            raise DPPlanError(f"clipping_mode must be one of {CLIPPING_MODES}, got {self.clipping_mode!r}")
        if not isinstance(self.secure_mode, bool):
            raise DPPlanError(f"secure_mode must be a bool, got {self.secure_mode!r}")

    @property
    def total_steps(self) -> int:
        return self.rounds * self.local_steps

    def check_records(self, n_records: int) -> None:
        """Refuse a plan that does not fit a partition of ``n_records`` records."""
        if isinstance(n_records, bool) or not isinstance(n_records, int) or n_records < 1:
            raise DPPlanError(f"n_records must be an int >= 1, got {n_records!r}")
        if self.expected_batch_size > n_records:
            raise DPPlanError(
                f"expected_batch_size={self.expected_batch_size} is larger than the data ({n_records} records): "
                f"choose expected_batch_size <= {n_records}"
            )
        if self.delta >= 1.0 / n_records:
            raise DPPlanError(
                f"delta={self.delta:g} is not below 1/n_records={1.0 / n_records:g} for {n_records} records "
                f"(a larger delta allows releasing a record outright): choose delta <= {0.1 / n_records:.1g}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> DPPlan:
        """Parse a plan from JSON-like data; unknown keys are refused, types are not coerced."""
        if not isinstance(raw, Mapping):
            raise DPPlanError(f"a DP plan must be a mapping, got {type(raw).__name__}")
        known = {f.name for f in fields(DPPlan)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DPPlanError(f"unknown DP plan fields {unknown}: the fields are {sorted(known)}")
        values = dict(raw)
        for name in ("clip_norm", "delta", "target_epsilon", "noise_multiplier", "learning_rate"):
            # JSON writes 1.0 as 1; accept an int for a float field (never a bool).
            if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
                values[name] = float(values[name])
        try:
            return DPPlan(**values)
        except TypeError as exc:
            raise DPPlanError(f"incomplete DP plan: {exc}") from exc


@dataclass(frozen=True, kw_only=True)
class CalibratedPlan:
    """A plan the site approved for a partition of ``n_records``: the noise is now fixed for the whole run."""

    plan: DPPlan
    n_records: int  # size of the private partition it was calibrated for
    noise_multiplier: float  # sigma used in every step of every round
    sample_rate: float  # q = expected_batch_size / n_records
    run_epsilon: float  # epsilon of this run alone (rounds * local_steps steps) at plan.delta
    projected_epsilon: float  # epsilon of the ledger's history composed with this whole run, at the budget's delta
    budget_epsilon: float  # the budget it was checked against

    def __post_init__(self) -> None:
        self.plan.check_records(self.n_records)
        try:
            check_noise_multiplier(self.noise_multiplier)
        except AccountingError as exc:
            raise DPPlanError(str(exc)) from exc
        expected = self.plan.expected_batch_size / self.n_records
        if not math.isclose(self.sample_rate, expected, rel_tol=1e-12):
            raise DPPlanError(f"sample_rate={self.sample_rate!r} is not expected_batch_size / n_records = {expected!r}")

    def event(self, *, run_id: str, round_index: int) -> PrivacyEvent:
        """The privacy event of one round of this plan."""
        return PrivacyEvent(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.plan.local_steps,
            run_id=run_id,
            round_index=round_index,
        )

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["plan"] = self.plan.to_dict()
        return document

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> CalibratedPlan:
        values = dict(raw)
        values["plan"] = DPPlan.from_dict(values.get("plan", {}))
        return CalibratedPlan(**values)


def calibrate_plan(plan: DPPlan, *, n_records: int, ledger: PrivacyLedger) -> CalibratedPlan:
    """Fix the noise multiplier of ``plan`` for a site's partition and ledger (at approval time).

    sigma is the larger of (a) the researcher's ask: the run alone reaches ``plan.target_epsilon`` at
    ``plan.delta`` over ``rounds * local_steps`` steps, and (b) the site's budget: the ledger's history
    composed with the whole run stays within the budget at the budget's delta. With an explicit
    ``plan.noise_multiplier`` only (b) is checked, and a plan that does not fit is refused.
    """
    plan.check_records(n_records)
    if plan.accountant != ledger.accountant:
        raise DPPlanError(f"plan accountant={plan.accountant!r} differs from the ledger's {ledger.accountant!r}")
    budget = ledger.budget
    sample_rate = plan.expected_batch_size / n_records
    steps = plan.total_steps
    history = ledger.history()
    try:
        if plan.noise_multiplier is not None:
            sigma = float(plan.noise_multiplier)
        else:
            sigma = calibrate_noise_multiplier(
                target_epsilon=float(plan.target_epsilon or 0.0),
                delta=plan.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=plan.accountant,
            )
            budget_sigma = calibrate_noise_multiplier(
                target_epsilon=budget.epsilon,
                delta=budget.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=plan.accountant,
                prior=history,
            )
            sigma = max(sigma, budget_sigma)
    except AccountingError as exc:
        raise BudgetExceededError(f"site {ledger.site!r}: {exc}") from exc
    projected = epsilon_of([*history, (sigma, sample_rate, steps)], delta=budget.delta, accountant=plan.accountant)
    if projected > budget.epsilon:
        raise BudgetExceededError(
            f"site {ledger.site!r} refuses the plan for dataset {ledger.dataset!r} and researcher {ledger.researcher!r}: "
            f"{steps} steps at noise_multiplier={sigma:g}, sample_rate={sample_rate:g} would reach "
            f"epsilon={projected:.4f} (delta={budget.delta:g}), over the budget epsilon={budget.epsilon:g}"
        )
    run_epsilon = epsilon_of([(sigma, sample_rate, steps)], delta=plan.delta, accountant=plan.accountant)
    return CalibratedPlan(
        plan=plan,
        n_records=n_records,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        run_epsilon=run_epsilon,
        projected_epsilon=projected,
        budget_epsilon=budget.epsilon,
    )


# ----------------------------------------------------------------------------------------------
# The model side: which layers may train, and the position_ids fix.


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def check_trainable_layers(model: nn.Module, *, clipping_mode: str) -> None:
    """Refuse a model whose trainable parameters are not all in layers with exact per-sample gradients.

    Every module that directly owns a trainable parameter must be a layer Opacus has a registered
    per-sample gradient (hooks) or norm (ghost) function for; anything else would fall back to
    generic machinery or fail halfway through training. Opacus's own validator also runs (it refuses
    BatchNorm, whose running statistics mix records, among others).
    """
    if clipping_mode not in CLIPPING_MODES:
        raise DPPlanError(f"clipping_mode must be one of {CLIPPING_MODES}, got {clipping_mode!r}")
    supported = set(GradSampleModule.GRAD_SAMPLERS)
    if not trainable_parameters(model):
        raise UnsupportedLayerError("the model has no trainable parameters: select a trainable set")
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)) and type(module) not in supported:
            raise UnsupportedLayerError(
                f"trainable layer {name!r} is a {type(module).__name__}, which has no exact per-sample gradient "
                f"in clipping_mode={clipping_mode!r}: freeze it or choose a trainable set of "
                f"{sorted(t.__name__ for t in supported)} layers"
            )
    ModuleValidator.validate(model, strict=True)


class BatchedEmbeddingIndices:
    """Give every trainable embedding an index tensor with the batch dimension it is used with.

    Hugging Face BERT looks up position embeddings with its ``position_ids`` buffer of shape [1, L]
    and lets broadcasting add the [1, L, H] result to the [B, L, H] token embeddings. The gradient of
    that lookup is then summed over the batch before any hook sees it, and Opacus's per-sample
    gradient of ``position_embeddings.weight`` has batch size 1 ([1, max_len, H]): the per-sample
    norms are wrong or (Opacus 1.6) the clipping fails on mismatched shapes. The fix changes no value:
    a forward pre-hook on each trainable ``nn.Embedding`` expands a batch-1 index tensor to
    [B, L] (B read from ``input_ids`` by a pre-hook on the model), so the lookup returns [B, L, H],
    the addition is elementwise, and each record's gradient reaches the embedding separately.
    The token-type ids, which HF expands from a buffer with stride 0, are made contiguous, since
    Opacus's ghost-clipping norm of an embedding reshapes its ids with ``view``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.batch_size: int | None = None
        self._handles = [model.register_forward_pre_hook(self._record_batch_size, with_kwargs=True)]
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.weight.requires_grad:
                self._handles.append(module.register_forward_pre_hook(self._expand_indices))

    def _record_batch_size(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for tensor in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]):
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2:
                self.batch_size = int(tensor.shape[0])
                return

    def _expand_indices(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        indices = args[0] if args else None
        if self.batch_size is None or not isinstance(indices, torch.Tensor) or indices.dim() < 1:
            return None
        if indices.shape[0] == 1 and self.batch_size > 1:
            # [1, L] -> [B, L]: same ids for every record, one row of gradients per record.
            return (indices.expand(self.batch_size, *indices.shape[1:]).contiguous(), *args[1:])
        if not indices.is_contiguous():
            # HF expands token_type_ids with stride 0; Opacus's ghost norm calls .view() on the ids.
            return (indices.contiguous(), *args[1:])
        return None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ----------------------------------------------------------------------------------------------
# Data.


def tokenize(tokenizer: Any, texts: Sequence[str], *, max_length: int, tail_tokens: int = 0,
             padding: bool | str = True) -> Any:
    """Tokenize ``texts`` to tensors of at most ``max_length`` tokens each, special tokens included.

    A text that is too long keeps its first tokens and, with ``tail_tokens`` > 0, its last
    ``tail_tokens`` ones instead of the tokens just after the first (head + tail truncation: a movie
    review's verdict is often in its last sentences). ``tail_tokens=0`` is the tokenizer's own
    truncation from the right. ``padding`` is the tokenizer's: True pads to the longest text,
    "max_length" to ``max_length``.
    """
    check_tail_tokens(tail_tokens, max_length)
    texts = [str(text) for text in texts]
    if tail_tokens == 0:
        return tokenizer(texts, truncation=True, max_length=max_length, padding=padding, return_tensors="pt")
    encoded = tokenizer(texts, truncation=False, return_special_tokens_mask=True, verbose=False)
    rows = []
    for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"], strict=True):
        if len(ids) > max_length:
            leading = sum(1 for _ in itertools.takewhile(bool, special))
            tail = tail_tokens + sum(1 for _ in itertools.takewhile(bool, reversed(special)))  # with [SEP]
            if max_length - tail < leading:
                raise DPPlanError(f"tail_tokens={tail_tokens} leaves no room for the tokenizer's special tokens in "
                                  f"max_length={max_length}: choose a smaller tail_tokens")
            ids = ids[: max_length - tail] + ids[len(ids) - tail :]
        rows.append(ids)
    return tokenizer.pad({"input_ids": rows}, padding=padding, return_tensors="pt",
                         max_length=max_length if padding == "max_length" else None)


def recipe_tail_tokens(max_length: int) -> int:
    """The default DP recipe's ``tail_tokens``: three quarters of a review's tokens from its end (94 of 128).

    On frozen all-MiniLM-L6-v2 embeddings of IMDB reviews at 128 tokens the zero-shot prompt head scored
    0.725 with the first 126 tokens, 0.745 with the first 64 and last 62, 0.755 with 32 + 94 (1,000 test reviews).
    """
    return 3 * (max_length - 2) // 4


def check_tail_tokens(tail_tokens: int, max_length: int) -> None:
    """Refuse a ``tail_tokens`` that is not an int in [0, max_length - 2]."""
    if isinstance(tail_tokens, bool) or not isinstance(tail_tokens, int) or not 0 <= tail_tokens <= max_length - 2:
        raise DPPlanError(f"tail_tokens must be an int in [0, max_length - 2] = [0, {max_length - 2}] (tokens kept "
                          f"from the end of a text that is too long; 0 keeps the start only), got {tail_tokens!r}")


def encode_texts(tokenizer: Any, texts: Sequence[str], labels: Sequence[int], *, max_length: int,
                 tail_tokens: int = 0) -> TensorDataset:
    """Tokenize to a TensorDataset of (input_ids [n, max_length], attention_mask [n, max_length], labels [n]).

    ``tail_tokens``: head + tail truncation of long texts (see ``tokenize``).
    """
    if len(texts) != len(labels):
        raise DPPlanError(f"texts and labels differ in length: {len(texts)} != {len(labels)}")
    encoded = tokenize(tokenizer, texts, max_length=max_length, tail_tokens=tail_tokens, padding="max_length")
    label_tensor = torch.tensor([int(label) for label in labels], dtype=torch.long)
    return TensorDataset(encoded["input_ids"], encoded["attention_mask"], label_tensor)


def _trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row of this physical batch (right padding)."""
    length = max(int(attention_mask.sum(dim=1).max().item()), 1)
    return input_ids[:, :length].contiguous(), attention_mask[:, :length].contiguous()  # [b, length] each


# ----------------------------------------------------------------------------------------------
# Randomness: the DP-SGD noise and the Poisson sampling, from a CSPRNG nothing in the process can seed.
#
# The researcher's code runs in the site's process before training (it builds the model), so it can
# seed or read torch's default generator; and torch's generators (MT19937 on the CPU, Philox on CUDA)
# are not cryptographic: a few outputs or the seed give away every later one. With secure_mode (every
# plan's default) no torch generator draws the noise or the batches.

# Coordinates per key-stream request: 2 MiB of key stream and 3.5 MiB of float64 work arrays, made once
# per sampler (arrays allocated per call ran at a fifth of the speed here: fresh pages every call).
NOISE_CHUNK = 1 << 16
_AES_BLOCK = 16  # bytes; Cipher.update_into wants this much headroom beyond the input


class AesCtrRandomStream:
    """Uniform random bits: the AES-256-CTR key stream under a fresh key and counter from ``os.urandom``.

    AES in counter mode under a secret 256-bit key is a pseudorandom generator: its output cannot be
    told from uniform bits without the key, up to the birthday bound of ~2^64 blocks (a round on full
    MiniLM draws ~2^25 blocks per step). The key lives only in this object (OpenSSL's cipher context,
    through ``cryptography``), is drawn from the kernel's CSPRNG when the object is made, and is never
    written anywhere. Key stream runs at ~5 GB/s with AES-NI; ``os.urandom`` itself at ~0.3 GB/s.
    Not thread-safe: one stream per sampler.
    """

    def __init__(self) -> None:
        self._encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
        self._zeros = np.zeros(0, dtype=np.uint8)  # plaintext: the cipher text of zeros is the key stream
        self._stream = np.empty(0, dtype=np.uint8)  # reused between calls (fresh pages cost more than AES)

    def _key_stream(self, count: int) -> np.ndarray:
        """The next ``count`` key-stream words, in this stream's buffer (overwritten by the next call): uint64 [count]."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an int >= 0, got {count!r}")
        size = 8 * count
        if self._zeros.size < size:
            self._zeros = np.zeros(size, dtype=np.uint8)
            self._stream = np.empty(size + _AES_BLOCK - 1, dtype=np.uint8)
        written = self._encryptor.update_into(self._zeros.data[:size], self._stream.data)  # .data: memoryviews
        if written != size:
            raise RuntimeError(f"AES-CTR wrote {written} bytes of key stream, {size} were asked for")
        return self._stream[:size].view(np.uint64)

    def words(self, count: int) -> np.ndarray:
        """``count`` independent uniform 64-bit words: uint64 [count]."""
        return self._key_stream(count).copy()

    def uniform53(self, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """``count`` independent uniforms on the grid {0, 1, ..., 2^53 - 1} * 2^-53 in [0, 1): float64 [count].

        The top 53 bits of each word: a double's whole significand, so every value, and ``1 - u`` in
        (0, 1], is exact. Written into ``out`` (float64, at least ``count`` long) when given.
        """
        words = self._key_stream(count)
        words >>= np.uint64(11)
        target = np.empty(count, dtype=np.float64) if out is None else out[:count]
        np.multiply(words, 2.0**-53, out=target)  # uint64 < 2^53 to float64 is exact, so is the power of two
        return target


class UniformSource(Protocol):
    """What the samplers below draw from (``AesCtrRandomStream``; a stub in the tests)."""

    def uniform53(self, count: int, out: np.ndarray | None = None) -> np.ndarray: ...


class SecureGaussianNoise:
    """N(0, std^2) noise from a CSPRNG, summed so as to resist the floating-point attacks on samplers.

    Each coordinate is ``(z1 + z2 + z3 + z4) * std / 2`` with z_i independent N(0, 1), so its variance
    is 4 * std^2 / 4 = std^2. Each z_i is a Box-Muller draw (Box & Muller 1958):
    ``z = sqrt(-2 ln(1 - u1)) * cos(2 pi u2)`` and its twin ``... * sin(2 pi u2)``, u1, u2 uniform on the
    53-bit grid (``AesCtrRandomStream.uniform53``), computed in float64 and rounded once to the
    gradient's dtype at the end.

    Notes
    -----
    Why a sum of four. Mironov (CCS 2012, "On significance of the least significant bits for
    differential privacy") showed that a textbook floating-point sampler reaches only a sparse set of
    doubles, a set that depends on the value the noise is added to, so one output can reveal the
    input. Jin, McMurtry, Rubinstein & Ohrimenko (IEEE S&P 2022, "Are we there yet? Timing and
    floating-point attacks on differential privacy systems") carried the attack to Gaussian samplers,
    Opacus's among them. Holohan & Braghin (ESORICS 2021, "Secure random sampling in differential
    privacy", Section 5.1) defend by summing 2n independent draws: inverting the sum costs 2^(53(2n-1))
    guesses, 2^159 for n = 2. Opacus's ``secure_mode`` does the same with torch's generators
    (``opacus.optimizers.optimizer._generate_noise``); here the bits come from AES-CTR instead.

    Box-Muller has no rejection loop: the time taken depends on the number of coordinates only, never
    on the values drawn (the timing channel of Jin et al. is in samplers whose loop count depends on
    the output). One draw's radius is at most sqrt(2 * 53 ln 2) = 8.57, so the sum is bounded by
    17.1 std; a Gaussian puts ~1e-65 of its mass beyond that, nothing a delta of 1e-5 would notice.

    Not thread-safe: the sampler reuses its work arrays between calls (one sampler per optimizer).
    """

    def __init__(self, source: UniformSource | None = None) -> None:
        self.source: UniformSource = source if source is not None else AesCtrRandomStream()
        self._uniforms = np.empty(4 * NOISE_CHUNK, dtype=np.float64)  # radius then angle uniforms of a chunk
        self._cosines = np.empty(2 * NOISE_CHUNK, dtype=np.float64)
        self._sums = np.empty(NOISE_CHUNK, dtype=np.float64)

    def sample(self, std: float, *, like: torch.Tensor) -> torch.Tensor:
        """Noise with ``like``'s shape, dtype and device, each coordinate N(0, std^2)."""
        if isinstance(std, bool) or not isinstance(std, int | float) or not math.isfinite(std) or std < 0:
            raise DPPlanError(f"noise std must be a finite number >= 0, got {std!r}")
        if std == 0:
            return torch.zeros_like(like)
        count = like.numel()
        # float64 sums, rounded once to the gradient's dtype (numpy has no bfloat16: those round in torch)
        dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(like.dtype, np.float64)
        flat = np.empty(count, dtype=dtype)  # [numel]
        for start in range(0, count, NOISE_CHUNK):
            stop = min(start + NOISE_CHUNK, count)
            np.multiply(self._sum_of_four_normals(stop - start), std / 2.0, out=flat[start:stop], casting="same_kind")
        return torch.from_numpy(flat).to(like.dtype).reshape(like.shape).to(like.device)

    def _sum_of_four_normals(self, count: int) -> np.ndarray:
        """z1 + z2 + z3 + z4 for each of ``count`` <= NOISE_CHUNK coordinates, the z's independent N(0, 1).

        Returns float64 [count], a view of the work arrays (valid until the next call). 2m Box-Muller
        pairs (m = max(count, 2)) give 4m normals. The two halves of a pair share their radius, so both
        must never land in one coordinate (their sum would be one draw in disguise): coordinate c gets
        the cosine halves of pairs c and m + c and the sine halves of pairs c - 1 and m + c - 1 (mod m),
        four different pairs since m >= 2.
        """
        m = max(count, 2)
        u = self.source.uniform53(4 * m, out=self._uniforms)  # [4m]: 2m radius uniforms, then 2m angle uniforms
        radius, angle = u[: 2 * m], u[2 * m : 4 * m]  # [2m] each, pair j = (radius[j], angle[j])
        np.subtract(1.0, radius, out=radius)  # (0, 1], exact
        np.log(radius, out=radius)
        radius *= -2.0
        np.sqrt(radius, out=radius)
        angle *= 2.0 * np.pi
        cosines = self._cosines[: 2 * m]
        np.cos(angle, out=cosines)
        sines = np.sin(angle, out=angle)
        cosines *= radius  # [2m]: z of pair j
        sines *= radius  # [2m]: its twin
        total = self._sums[:m]
        np.add(cosines[:m], cosines[m:], out=total)  # [m]: pairs c and m + c
        sine_sums = sines[:m]
        sine_sums += sines[m:]  # [m]: pairs j and m + j, for coordinate j + 1 (mod m)
        total[1:] += sine_sums[:-1]
        total[0] += sine_sums[-1]
        return total[:count]


class _SecureNoiseStep:
    """Opacus's ``add_noise`` with the noise drawn by ``SecureGaussianNoise`` (mixed into both DP optimizers).

    As in Opacus 1.6 (``DPOptimizer.add_noise``): the noise, std = noise_multiplier * max_grad_norm,
    is added to the *sum* of the clipped per-sample gradients, ``p.grad = (p.summed_grad + noise)``;
    ``scale_grad`` divides by the expected batch size afterwards; ``_mark_as_processed`` lets Opacus
    refuse a second step on the same gradients without ``zero_grad``. ``_adjusted_noise_multiplier``
    is the fast-gradient-clipping optimizer's adaptive-clipping override (never set here).
    """

    params: list[Any]  # Opacus's DPOptimizer.params: the trainable parameters, each with Opacus's summed_grad
    noise_multiplier: float
    max_grad_norm: float
    noise_source: SecureGaussianNoise

    def add_noise(self) -> None:
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + self.noise_source.sample(std, like=p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)


def _refuse_torch_generator(kwargs: Mapping[str, Any]) -> None:
    if kwargs.get("generator") is not None or "secure_mode" in kwargs:
        raise DPPlanError("a secure-noise optimizer draws its noise from SecureGaussianNoise: pass neither a "
                          "torch generator nor secure_mode")


class _FiniteRecords:
    """A record whose per-sample gradient is not finite contributes nothing to the step.

    Clipping bounds a finite gradient's norm, not a NaN or an infinity: one such record would make the
    whole summed gradient non-finite, and whether a round then fails would say whether that record was in
    the batch. A researcher can choose a global model that overflows for one particular review (weights
    near float32's limit pointed at its embedding), so this is a membership oracle outside any epsilon.
    Zeroing the record's gradient keeps its contribution within the clip bound (zero), the sum finite and
    the round's outcome a function of the noisy sums only. Per-sample gradients of BERT are independent
    across records (LayerNorm, not BatchNorm), so one record's overflow cannot reach another's.
    """

    params: list[Any]
    _get_flat_grad_sample: Callable[[Any], torch.Tensor]

    def clip_and_accumulate(self) -> None:
        samples = [self._get_flat_grad_sample(p) for p in self.params]
        if samples and len(samples[0]):
            finite = torch.ones(len(samples[0]), dtype=torch.bool, device=samples[0].device)
            for sample in samples:
                finite &= torch.isfinite(sample.reshape(len(sample), -1)).all(dim=1).to(finite.device)
            for p, sample in zip(self.params, samples, strict=True):
                keep = finite.to(sample.device).view(-1, *([1] * (sample.dim() - 1)))
                p.grad_sample = torch.where(keep, sample, torch.zeros((), dtype=sample.dtype, device=sample.device))
        super().clip_and_accumulate()  # type: ignore[misc]


class FiniteRecordsDPOptimizer(_FiniteRecords, DPOptimizer):
    """Opacus's ``DPOptimizer`` with torch's noise, where a non-finite per-sample gradient counts as zero."""


class SecureNoiseDPOptimizer(_SecureNoiseStep, _FiniteRecords, DPOptimizer):
    """Opacus's ``DPOptimizer`` (per-sample gradients, "hooks") with CSPRNG noise."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_source: SecureGaussianNoise, **kwargs: Any) -> None:
        _refuse_torch_generator(kwargs)
        super().__init__(optimizer, generator=None, secure_mode=True, **kwargs)
        self.noise_source = noise_source


class SecureNoiseFastGradientClippingOptimizer(_SecureNoiseStep, DPOptimizerFastGradientClipping):
    """Opacus's ``DPOptimizerFastGradientClipping`` (ghost clipping) with CSPRNG noise."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_source: SecureGaussianNoise, **kwargs: Any) -> None:
        _refuse_torch_generator(kwargs)
        super().__init__(optimizer, generator=None, secure_mode=True, **kwargs)
        self.noise_source = noise_source


class SecurePoissonSampler(UniformWithReplacementSampler):
    """Opacus's Poisson sampling, each record in each batch independently with probability q, from a CSPRNG.

    Record i is in a batch when u_i < q, u_i uniform on the 53-bit grid: probability ceil(q 2^53) / 2^53,
    within 2^-53 of q. Opacus's own sampler compares ``torch.rand`` with q the same way.
    """

    def __init__(self, *, num_samples: int, sample_rate: float, source: UniformSource) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, generator=None)
        self.source = source

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield np.flatnonzero(self.source.uniform53(self.num_samples) < self.sample_rate).tolist()


def _fresh_seed() -> int:
    return int.from_bytes(os.urandom(8), "big") & ((1 << 63) - 1)


@dataclass
class _Generators:
    """The torch generators of a round; with secure_mode neither draws noise or batches.

    With secure_mode the one generator left, ``sampling``, only feeds the DataLoader's base seed (which
    would otherwise consume torch's default generator). Without it (benches and reference tests only)
    Opacus draws the batches from ``sampling`` and the noise from ``noise``, both reseeded from
    ``os.urandom`` (64 bits) before every logical step, unless a reference test fixed a ``seed``.
    """

    sampling: torch.Generator
    noise: torch.Generator | None  # None with secure_mode: SecureGaussianNoise draws the noise
    reseed_each_step: bool

    def reseed(self) -> None:
        if self.reseed_each_step:
            self.sampling.manual_seed(_fresh_seed())
            if self.noise is not None:
                self.noise.manual_seed(_fresh_seed())


def _generators(device: torch.device, *, secure_mode: bool, seed: int | None) -> _Generators:
    if secure_mode and seed is not None:
        raise DPPlanError(
            f"seed={seed!r} makes the noise predictable and is refused with secure noise (secure_mode=True, every "
            "plan's default): drop the seed, or, for a reference test or a bench only, turn secure noise off "
            "explicitly with secure_mode=False"
        )
    sampling = torch.Generator(device="cpu")
    sampling.manual_seed(_fresh_seed() if seed is None else seed)
    if secure_mode:
        return _Generators(sampling=sampling, noise=None, reseed_each_step=True)
    noise = torch.Generator(device=device)
    noise.manual_seed(_fresh_seed() if seed is None else seed + 1)
    return _Generators(sampling=sampling, noise=noise, reseed_each_step=seed is None)


def _dp_optimizer(
    base: torch.optim.Optimizer, *, ghost: bool, secure_mode: bool, generators: _Generators, **kwargs: Any
) -> DPOptimizer:
    """Opacus's optimizer for the clipping mode; with secure_mode its subclass that draws CSPRNG noise."""
    if secure_mode:
        secure = SecureNoiseFastGradientClippingOptimizer if ghost else SecureNoiseDPOptimizer
        return secure(base, noise_source=SecureGaussianNoise(), **kwargs)
    plain = DPOptimizerFastGradientClipping if ghost else FiniteRecordsDPOptimizer
    return plain(base, generator=generators.noise, secure_mode=False, **kwargs)


def _poisson_loader(
    dataset: TensorDataset, *, sample_rate: float, secure_mode: bool, generators: _Generators
) -> DataLoader:
    """Opacus's Poisson-sampling loader; with secure_mode its batches come from ``SecurePoissonSampler``.

    ``DPDataLoader`` builds its torch-driven sampler itself, so the secure loader is a plain DataLoader
    with the secure sampler and DPDataLoader's collate function (it turns an empty batch into
    zero-length tensors). BatchMemoryManager needs only a DataLoader whose batch sampler is a
    ``UniformWithReplacementSampler``.
    """
    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=generators.sampling)
    if not secure_mode:
        return loader
    sampler = SecurePoissonSampler(num_samples=len(dataset), sample_rate=sample_rate, source=AesCtrRandomStream())
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=loader.collate_fn, generator=generators.sampling)


# ----------------------------------------------------------------------------------------------
# Training.


@dataclass
class _DPTraining:
    """The Opacus objects of one round, wired to one model."""

    model: nn.Module  # the caller's model
    module: nn.Module  # the GradSampleModule wrapping the model
    optimizer: DPOptimizer
    loader: DataLoader  # Poisson sampling (see _poisson_loader)
    accountant: PRVAccountant | RDPAccountant
    criterion: Any  # DPLossFastGradientClipping (ghost) or None (hooks: plain mean cross-entropy)
    embedding_fix: BatchedEmbeddingIndices
    generators: _Generators

    def close(self) -> None:
        """Remove every hook and every trace of un-noised values from the caller's model.

        Opacus's own clean-up leaves ``p.summed_grad`` (the clipped gradient sum *before* noise),
        ``p.grad`` and the modules' captured ``activations`` (private inputs) behind when a step did
        not complete. The researcher's function holds the model after we return or raise, so all of
        it goes.
        """
        self.embedding_fix.remove()
        self.module._close()  # type: ignore[operator]
        for parameter in self.model.parameters():
            parameter.grad = None
            if hasattr(parameter, "summed_grad"):
                del parameter.summed_grad
        for module in self.model.modules():
            for attribute in ("activations", "max_batch_len"):
                if attribute in module.__dict__:  # not hasattr: peft wrappers forward attribute reads
                    delattr(module, attribute)


def _dp_training(
    model: nn.Module,
    dataset: TensorDataset,
    *,
    noise_multiplier: float,
    clip_norm: float,
    sample_rate: float,
    expected_batch_size: int,
    clipping_mode: str,
    optimizer_name: str,
    learning_rate: float,
    accountant: str,
    secure_mode: bool,
    device: torch.device,
    seed: int | None = None,
) -> _DPTraining:
    """Wire Opacus around ``model``. ``noise_multiplier`` may be 0 here only for the reference tests.

    With ``secure_mode`` (every plan's default) the noise and the Poisson batches come from a CSPRNG
    (``SecureGaussianNoise``, ``SecurePoissonSampler``) and ``seed`` is refused; ``secure_mode=False``
    leaves both to Opacus and torch's generators, for benches and reference tests that need a ``seed``.
    """
    params = [parameter for _, parameter in trainable_parameters(model)]
    if optimizer_name == "adamw":
        base: torch.optim.Optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    else:
        base = torch.optim.SGD(params, lr=learning_rate)
    generators = _generators(device, secure_mode=secure_mode, seed=seed)
    embedding_fix = BatchedEmbeddingIndices(model)
    noise = {"noise_multiplier": noise_multiplier, "max_grad_norm": clip_norm,
             "expected_batch_size": expected_batch_size, "loss_reduction": "mean"}
    criterion = None
    if clipping_mode == "ghost":
        module: nn.Module = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=clip_norm, use_ghost_clipping=True
        )
        optimizer = _dp_optimizer(base, ghost=True, secure_mode=secure_mode, generators=generators, **noise)
        criterion = DPLossFastGradientClipping(module, optimizer, nn.CrossEntropyLoss(reduction="mean"), "mean")
    else:
        module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = _dp_optimizer(base, ghost=False, secure_mode=secure_mode, generators=generators, **noise)
    tracker: PRVAccountant | RDPAccountant = PRVAccountant() if accountant == "prv" else RDPAccountant()
    optimizer.attach_step_hook(tracker.get_optimizer_hook_fn(sample_rate=sample_rate))
    loader = _poisson_loader(dataset, sample_rate=sample_rate, secure_mode=secure_mode, generators=generators)
    return _DPTraining(model, module, optimizer, loader, tracker, criterion, embedding_fix, generators)


def _steps_taken(accountant: PRVAccountant | RDPAccountant) -> int:
    return sum(steps for _, _, steps in accountant.history)


def _empty_batch_gradients(training: _DPTraining, clipping_mode: str) -> None:
    """An empty Poisson batch still takes a noisy step (the mechanism releases noise, not nothing)."""
    for parameter in training.optimizer.params:
        if clipping_mode == "ghost":
            parameter.grad = torch.zeros_like(parameter)
        else:
            parameter.grad_sample = torch.zeros((0, *parameter.shape), dtype=parameter.dtype, device=parameter.device)


def _physical_step(
    training: _DPTraining,
    batch: Sequence[torch.Tensor],
    *,
    clipping_mode: str,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, int]:
    """Forward and backward of one physical batch; returns (summed loss as a 0-d tensor, batch size).

    ``batch`` is (input_ids [b, L], attention_mask [b, L], labels [b]) on the CPU; padding is trimmed
    there, so no device synchronisation happens per step.
    """
    input_ids, attention_mask, labels = batch
    if input_ids.shape[0] == 0:
        _empty_batch_gradients(training, clipping_mode)
        return torch.zeros(()), 0
    input_ids, attention_mask = _trim_padding(input_ids, attention_mask)
    input_ids, attention_mask, labels = (t.to(device, non_blocking=True) for t in (input_ids, attention_mask, labels))
    with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        outputs = training.module(input_ids=input_ids, attention_mask=attention_mask)
    logits = (outputs.logits if hasattr(outputs, "logits") else outputs[0]).float()  # [b, num_labels]
    if clipping_mode == "ghost":
        loss = training.criterion(logits, labels)
    else:
        loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach() * labels.shape[0], int(labels.shape[0])


class _TailAverage:
    """The running sum of the parameters after each of the last ``count`` of ``steps`` logical steps.

    Each iterate is a function of the noisy gradients released so far, so their mean is post-processing
    of the same DP mechanism: it costs no privacy (Polyak-Ruppert averaging of the round's tail).
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]], *, steps: int, count: int) -> None:
        self.named, self.first, self.count = named, steps - count + 1, count
        self.sums: list[torch.Tensor] | None = None

    def after_step(self, step: int) -> None:
        """Called with the 1-based number of logical steps taken so far."""
        if step < self.first:
            return
        with torch.no_grad():
            values = [parameter.detach().double() for _, parameter in self.named]
            if self.sums is None:
                self.sums = values
            else:
                for total, value in zip(self.sums, values, strict=True):
                    total.add_(value)

    def apply(self) -> None:
        """Write the mean of the recorded iterates into the parameters."""
        if self.sums is None:
            raise RuntimeError(f"no iterate recorded for the last {self.count} steps: nothing to average")
        with torch.no_grad():
            for (_, parameter), total in zip(self.named, self.sums, strict=True):
                parameter.copy_((total / self.count).to(parameter.dtype))


def _run_steps(
    training: _DPTraining,
    *,
    steps: int,
    max_physical_batch_size: int,
    clipping_mode: str,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    tail: _TailAverage | None = None,
) -> float:
    """Exactly ``steps`` logical DP-SGD steps; returns the mean training loss (site-internal, not DP).

    With ``tail``, the parameters end as the mean of the iterates it records instead of the last one.
    """
    loss_sum, seen = torch.zeros((), device=device), 0
    training.module.train()
    with BatchMemoryManager(
        data_loader=training.loader, max_physical_batch_size=max_physical_batch_size, optimizer=training.optimizer
    ) as physical_loader:
        while _steps_taken(training.accountant) < steps:
            for batch in physical_loader:
                batch_loss, batch_size = _physical_step(
                    training, batch, clipping_mode=clipping_mode, device=device, amp_dtype=amp_dtype
                )
                loss_sum, seen = loss_sum + batch_loss.to(device), seen + batch_size
                before = _steps_taken(training.accountant)
                training.optimizer.step()
                training.optimizer.zero_grad(set_to_none=True)
                taken = _steps_taken(training.accountant)
                if taken > before:
                    training.generators.reseed()
                    if tail is not None:
                        tail.after_step(taken)
                if taken >= steps:
                    break
    if tail is not None:
        tail.apply()
    return float(loss_sum) / seen if seen else 0.0


@dataclass(frozen=True)
class LocalRoundResult:
    """What one round at one site produced; nothing in it has left the site yet.

    ``delta`` maps each trainable parameter name (as in ``model.named_parameters()``) to
    trained - initial, float32 on CPU, in ``names`` order. For syft's mock execution it is all zeros,
    ``is_mock`` is True and ``event``/``ledger_record`` are None. ``mean_loss`` and ``n_examples``
    are computed from private data without noise: keep them inside the site or release them only
    through the secure sum (DESIGN.md, "Privacy").
    """

    names: tuple[str, ...]
    delta: dict[str, torch.Tensor]
    event: PrivacyEvent | None
    ledger_record: LedgerRecord | None
    n_examples: int
    mean_loss: float
    is_mock: bool

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(self.delta[name].shape) for name in self.names)

    def flat_delta(self) -> torch.Tensor:
        """All deltas concatenated in ``names`` order: float32 [sum of numels]."""
        return torch.cat([self.delta[name].reshape(-1) for name in self.names])


def _restore(named: list[tuple[str, nn.Parameter]], initial: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, parameter in named:
            parameter.copy_(initial[name])


def _mock_result(named: list[tuple[str, nn.Parameter]]) -> LocalRoundResult:
    delta = {name: torch.zeros(parameter.shape, dtype=torch.float32) for name, parameter in named}
    return LocalRoundResult(
        names=tuple(delta), delta=delta, event=None, ledger_record=None, n_examples=0, mean_loss=0.0, is_mock=True
    )


def train_dp_sgd(
    model: nn.Module,
    dataset: TensorDataset,
    *,
    plan: CalibratedPlan,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> tuple[float, list[HistoryEntry]]:
    """``plan.plan.local_steps`` DP-SGD steps on ``dataset`` (no fingerprint, no ledger: the caller's job).

    With ``plan.plan.average_last_steps`` = k > 0 the model ends as the mean of its last k iterates.

    Returns the mean training loss (site-internal, not DP) and the history Opacus's accountant saw.
    Used by ``local_dp_round`` and by the centralised benchmarks, so both run the same code.
    """
    p = plan.plan
    training = _dp_training(
        model,
        dataset,
        noise_multiplier=plan.noise_multiplier,
        clip_norm=p.clip_norm,
        sample_rate=plan.sample_rate,
        expected_batch_size=p.expected_batch_size,
        clipping_mode=p.clipping_mode,
        optimizer_name=p.optimizer,
        learning_rate=p.learning_rate,
        accountant=p.accountant,
        secure_mode=p.secure_mode,
        device=device,
    )
    try:
        mean_loss = _run_steps(
            training,
            steps=p.local_steps,
            max_physical_batch_size=p.max_physical_batch_size,
            clipping_mode=p.clipping_mode,
            device=device,
            amp_dtype=amp_dtype,
            tail=_TailAverage(trainable_parameters(model), steps=p.local_steps, count=p.average_last_steps)
            if p.average_last_steps else None,
        )
        return mean_loss, list(training.accountant.history)
    finally:
        training.close()


def local_dp_round(
    model: nn.Module,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    tokenizer: Any,
    plan: CalibratedPlan,
    ledger: PrivacyLedger,
    private_fingerprint: str,
    run_id: str,
    round_index: int,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> LocalRoundResult:
    """One round of DP-SGD at a site: train ``model`` in place and return the delta of its trainable parameters.

    ``private_fingerprint`` is the ``partition_fingerprint`` the site recorded for its private
    partition; data that does not match it is syft's mock run, which neither trains nor spends.
    ``amp_dtype`` (e.g. torch.bfloat16) only changes arithmetic precision, never the privacy.
    Raises DPPlanError / UnsupportedLayerError / BudgetExceededError before any training.
    """
    if not isinstance(plan, CalibratedPlan):
        raise DPPlanError(f"plan must be a CalibratedPlan approved by the site, got {type(plan).__name__}")
    device = torch.device(device)
    check_trainable_layers(model, clipping_mode=plan.plan.clipping_mode)
    named = trainable_parameters(model)
    if len(texts) != len(labels):
        raise DPPlanError(f"texts and labels differ in length: {len(texts)} != {len(labels)}")
    if partition_fingerprint(texts, labels) != private_fingerprint:
        return _mock_result(named)
    if len(texts) != plan.n_records:
        raise DPPlanError(f"plan was calibrated for n_records={plan.n_records}, the partition has {len(texts)}")
    if plan.plan.accountant != ledger.accountant:
        raise DPPlanError(f"plan accountant={plan.plan.accountant!r} differs from the ledger's {ledger.accountant!r}")
    event = plan.event(run_id=run_id, round_index=round_index)
    ledger.check_spend(event)

    dataset = encode_texts(tokenizer, texts, labels, max_length=plan.plan.max_length, tail_tokens=plan.plan.tail_tokens)
    model.to(device)
    initial = {name: parameter.detach().clone() for name, parameter in named}
    try:
        mean_loss, seen = train_dp_sgd(model, dataset, plan=plan, device=device, amp_dtype=amp_dtype)
    except BaseException:
        # Steps that ran are not in the ledger: leave nothing of them in the caller's model.
        _restore(named, initial)
        raise
    if seen != [event.history_entry()]:
        _restore(named, initial)
        raise RuntimeError(f"Opacus accounted {seen}, the round was planned as {event.history_entry()}: nothing released")
    delta = {name: (parameter.detach() - initial[name]).float().cpu() for name, parameter in named}
    try:
        record = ledger.spend(event)
    except BaseException:
        _restore(named, initial)
        raise
    return LocalRoundResult(
        names=tuple(delta),
        delta=delta,
        event=event,
        ledger_record=record,
        n_examples=len(texts),
        mean_loss=mean_loss,
        is_mock=False,
    )


__all__ = [
    "ACCOUNTANTS",
    "CLIPPING_MODES",
    "DEFAULT_CLIPPING_MODE",
    "BatchedEmbeddingIndices",
    "CalibratedPlan",
    "DPPlan",
    "DPPlanError",
    "LocalRoundResult",
    "UnsupportedLayerError",
    "calibrate_plan",
    "check_tail_tokens",
    "check_trainable_layers",
    "encode_texts",
    "local_dp_round",
    "recipe_tail_tokens",
    "tokenize",
    "train_dp_sgd",
]
