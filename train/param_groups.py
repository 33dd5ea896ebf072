"""Regex parameter groups: one mechanism for freezing, lr/wd multipliers and partial loading.

Parameters are named by their path, e.g. `encoder/blocks/attn/query/kernel`; patterns are
matched with `re.fullmatch`, first match wins. A pattern that matches nothing is an error, so a
typo never silently trains (or freezes) the wrong weights.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax

from vistax.train.sharding import path_name


def names(tree) -> list[str]:
    """Path names of the leaves of `tree`, in leaf order."""
    return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def compile_regex(key: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{key}: invalid regex {pattern!r}: {e}") from None


def assign(tree, key: str, rules: Sequence[tuple[str, object]], default, *,
           required: bool = True):
    """A tree like `tree` whose leaves are the value of the first rule whose regex matches;
    a rule that matches nothing is an error unless `required` is False."""
    compiled = [(compile_regex(key, pattern), value) for pattern, value in rules]
    leaf_names = names(tree)
    used = [False] * len(compiled)

    def pick(name):
        for i, (regex, value) in enumerate(compiled):
            if regex.fullmatch(name):
                used[i] = True
                return value
        return default

    values = [pick(n) for n in leaf_names]
    for (pattern, _), hit in zip(rules, used):
        if required and not hit:
            examples = ", ".join(leaf_names[:4])
            raise ValueError(f"{key}: pattern {pattern!r} matches no parameter "
                             f"(names look like: {examples}, ...).")
    return jax.tree.unflatten(jax.tree.structure(tree), values)


def mask(tree, key: str, patterns: Sequence[str], *, required: bool = True):
    """Boolean tree: True where any of `patterns` matches the leaf's path."""
    return assign(tree, key, [(p, True) for p in patterns], False, required=required)


def as_pairs(key: str, value) -> list[tuple[str, float]]:
    """Validates a config value of the form ((regex, number), ...)."""
    pairs = []
    for entry in value or ():
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2
                and isinstance(entry[0], str) and isinstance(entry[1], (int, float))):
            raise ValueError(f"{key}: expected ((regex, number), ...), got entry {entry!r}.")
        pairs.append((entry[0], float(entry[1])))
    return pairs
