"""Evaluators by type: `config.evals.<name>.type` selects one; the loop runs each `every`."""

from vistax.evals.attention_maps import AttentionMapsEvaluator
from vistax.evals.base import DEFAULT_EVERY, EvalContext, Evaluator
from vistax.evals.classification import ClassificationEvaluator
from vistax.evals.fewshot import FewshotRidgeEvaluator
from vistax.evals.linear_probe import KnnEvaluator, LinearProbeEvaluator
from vistax.evals.metrics import MetricsEvaluator
from vistax.evals.reconstruction import ReconstructionEvaluator
from vistax.evals.retrieval import RetrievalEvaluator
from vistax.evals.zero_shot import ZeroShotEvaluator

__all__ = ["DEFAULT_EVERY", "EVALUATORS", "EvalContext", "Evaluator", "get"]

EVALUATORS: dict[str, type[Evaluator]] = {
    "classification": ClassificationEvaluator,
    "zero_shot": ZeroShotEvaluator,
    "retrieval": RetrievalEvaluator,
    "linear_probe": LinearProbeEvaluator,
    "knn": KnnEvaluator,
    "fewshot_ridge": FewshotRidgeEvaluator,
    "reconstruction": ReconstructionEvaluator,
    "attention_maps": AttentionMapsEvaluator,
    "metrics": MetricsEvaluator,
}


def get(name: str, type_name: str | None) -> type[Evaluator]:
    if type_name not in EVALUATORS:
        raise ValueError(f"evals.{name}.type={type_name!r} is not one of {sorted(EVALUATORS)}.")
    return EVALUATORS[type_name]
