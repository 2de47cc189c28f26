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

The package, one module per concept (as Opacus lays out ``accountants/``, ``optimizers/``,
``grad_sample/``), behind this one entry point:

* ``plan``: ``DPPlan``, what a researcher asks for, validated in full;
* ``calibration``: ``CalibratedPlan`` and ``calibrate_plan``, the noise fixed at approval (the
  accountants themselves are ``policies.accounting``);
* ``layers``: which layers may train (``check_trainable_layers``), and ``BatchedEmbeddingIndices``;
* ``noise``: the CSPRNG noise and Poisson sampling (``SecureGaussianNoise``, ``SecurePoissonSampler``);
* ``optimizers``: Opacus's DP optimizers with that noise, and a non-finite record counted as zero;
* ``engine``: Opacus wired around the model for one round, and its logical steps;
* ``round``: ``local_dp_round`` and ``train_dp_sgd``.

Text encoding is ``models.tokens`` (the site-installed ``models`` package).
"""

from policies.accounting import ACCOUNTANTS
from policies.dp.calibration import CalibratedPlan, calibrate_plan
from policies.dp.layers import BatchedEmbeddingIndices, check_trainable_layers, trainable_parameters
from policies.dp.noise import AesCtrRandomStream, SecureGaussianNoise, SecurePoissonSampler
from policies.dp.optimizers import (
    FiniteRecordsDPOptimizer,
    SecureNoiseDPOptimizer,
    SecureNoiseFastGradientClippingOptimizer,
)
from policies.dp.plan import (
    CLIPPING_MODES,
    DEFAULT_CLIPPING_MODE,
    OPTIMIZERS,
    DPPlan,
    DPPlanError,
    UnsupportedLayerError,
)
from policies.dp.round import LocalRoundResult, local_dp_round, train_dp_sgd

__all__ = [
    "ACCOUNTANTS",
    "CLIPPING_MODES",
    "DEFAULT_CLIPPING_MODE",
    "OPTIMIZERS",
    "AesCtrRandomStream",
    "BatchedEmbeddingIndices",
    "CalibratedPlan",
    "DPPlan",
    "DPPlanError",
    "FiniteRecordsDPOptimizer",
    "LocalRoundResult",
    "SecureGaussianNoise",
    "SecureNoiseDPOptimizer",
    "SecureNoiseFastGradientClippingOptimizer",
    "SecurePoissonSampler",
    "UnsupportedLayerError",
    "calibrate_plan",
    "check_trainable_layers",
    "local_dp_round",
    "train_dp_sgd",
    "trainable_parameters",
]
