"""XLA compiler options of the experiment's jitted functions (train step, init, evaluations).

`config.xla_cpu_dots` picks what runs dots on CPU. In jax 0.10 XLA hands every dot to YNNPACK
by default (`xla_cpu_experimental_ynn_fusion_type`: individual dots, individual convolutions,
reductions). "eigen" keeps YNNPACK for convolutions and reductions (with the dot a reduction
may take in: attention's scores feeding the softmax's max) and leaves the other dots to XLA's
own Eigen kernels, whose batched dots run attention's per-head products (ViT-Ti/16 at 224 px:
(32 x 3) x 197 x 64 x 197) up to 1.8x faster on this 2-core CPU; the Ti/16 step takes
2.31 s instead of 2.69 s (side by side in one process, 12 steps each). "xla_default" gives
XLA's choice back. Other platforms get no options.
"""

from __future__ import annotations

YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
CPU_DOTS = {
    "eigen": {YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,"
                               "LIBRARY_FUSION_TYPE_REDUCE"},
    "xla_default": {},
}


def compiler_options(config, platform: str) -> dict[str, str] | None:
    """The options for `jax.jit(..., compiler_options=...)` on `platform`; None for none."""
    choice = config.xla_cpu_dots
    if choice not in CPU_DOTS:
        raise ValueError(f"xla_cpu_dots={choice!r} is not one of {list(CPU_DOTS)}.")
    return dict(CPU_DOTS[choice]) if platform == "cpu" and CPU_DOTS[choice] else None
