"""Unlearning methods as pure single-model functions, vmapped over replicas by the ensemble runner.

Built-in methods (registered on import): ``do_nothing``, ``retrain`` (and partial retraining as
its snapshots), ``ga``, ``gda``, ``scrub``, ``finetune``, ``om``, ``dmm``, ``dmm_margin``. See
``README.md`` here for the method table (generated from the registry), grids, batch-norm policy,
optimisers and how to add a method.
"""

from ascent_jax.unlearn import grids
from ascent_jax.unlearn.base import (
    MemberInput,
    Method,
    MethodConfig,
    UnlearnData,
    UnlearnResult,
    all_finite,
    ascent_pass,
    derived_seed,
    descent_pass,
    get,
    gradient_step,
    learning_rate,
    make,
    names,
    register,
    relative_cost,
    run_pass,
    set_learning_rate,
    single_model,
    split_indices,
    stream_key,
    unlearn,
)
from ascent_jax.unlearn.gradient import FineTuneConfig, GradientAscentConfig, GradientDescentAscentConfig
from ascent_jax.unlearn.matching import (
    DatamodelMatchingConfig,
    MarginDatamodelMatchingConfig,
    OracleMatchingConfig,
    datamodel_targets,
    split_oracles,
    target_logits,
)
from ascent_jax.unlearn.optimizers import PLAIN_SGD, Optimizer
from ascent_jax.unlearn.reference import DoNothingConfig, RetrainConfig
from ascent_jax.unlearn.scrub import ScrubConfig

__all__ = [
    "DatamodelMatchingConfig", "DoNothingConfig", "FineTuneConfig", "GradientAscentConfig",
    "GradientDescentAscentConfig", "MarginDatamodelMatchingConfig", "MemberInput", "Method", "MethodConfig",
    "Optimizer", "OracleMatchingConfig", "PLAIN_SGD", "RetrainConfig", "ScrubConfig", "UnlearnData",
    "UnlearnResult", "all_finite", "ascent_pass", "datamodel_targets", "derived_seed", "descent_pass", "get",
    "gradient_step", "grids", "learning_rate", "make", "names", "register", "relative_cost", "run_pass",
    "set_learning_rate", "single_model", "split_indices", "split_oracles", "stream_key", "target_logits",
    "unlearn",
]
