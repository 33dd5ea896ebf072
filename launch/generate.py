"""`vistax generate`: continue a text prompt with a trained Perceiver AR run (cached sampling,
models/perceiver_ar.py: generate)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from vistax.data import tokenizers
from vistax.models import convert, perceiver_ar
from vistax.train import init_from, objectives


def load_model(config, workdir: str, step: int | None = None) -> perceiver_ar.PerceiverAR:
    """The Perceiver AR of `config` with the parameters of `workdir`'s checkpoint (latest or
    `step`)."""
    if config.objective != "perceiver_ar":
        raise ValueError(f"vistax generate needs a Perceiver AR config (objective "
                         f"'perceiver_ar'); this one has objective={config.objective!r}.")
    objective = objectives.get(config.objective)(config)
    objective.validate()
    model = objective.build_model(nnx.Rngs(0))
    nested: dict = {}
    for name, value in init_from.read_params(workdir, step).items():
        node = nested
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    convert.load_into(model, nested)
    return model


def generate_text(model: perceiver_ar.PerceiverAR, prompt: str, num_tokens: int, *,
                  temperature: float = 0.0, seed: int = 0) -> str:
    """The prompt's continuation (up to an end-of-text) as text; greedy at temperature 0."""
    tok = tokenizers.get("bytes")
    ids = tok.encode([prompt], len(prompt.encode("utf-8")) + 2)[0][:-1]  # bos + bytes, no eos
    out = perceiver_ar.generate(model, ids[None], num_tokens, temperature=temperature,
                                rng=jax.random.key(seed) if temperature > 0 else None)
    return tok.decode(np.asarray(out[0]))
