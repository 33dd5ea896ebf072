"""Objectives by name: `config.objective` selects one; adding a method adds a module here."""

from vistax.train.objectives.base import Objective
from vistax.train.objectives.classification import Classification
from vistax.train.objectives.coca import CoCa
from vistax.train.objectives.contrastive import Contrastive
from vistax.train.objectives.dino import DINO
from vistax.train.objectives.mae import MAE
from vistax.train.objectives.perceiver import Perceiver, PerceiverAR

OBJECTIVES: dict[str, type[Objective]] = {
    "classification": Classification,
    "contrastive": Contrastive,
    "coca": CoCa,
    "mae": MAE,
    "dino": DINO,
    "perceiver": Perceiver,
    "perceiver_ar": PerceiverAR,
}


def get(name: str | None) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r} is not one of {sorted(OBJECTIVES)}.")
    return OBJECTIVES[name]
