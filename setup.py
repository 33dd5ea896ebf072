"""Installs package `vistax`; its subpackages are this folder's top-level folders.

`pip install -c constraints.txt -e .[test]` is what CI and the README run; the constraints file
pins every version, transitive ones included.
"""
import setuptools

_SUBPACKAGES = setuptools.find_packages(where=".", exclude=("build*", "dist*"))

setuptools.setup(
    name="vistax",
    version="0.1.0",
    description="JAX/Flax pretraining of vision and multimodal transformers at scale.",
    python_requires=">=3.11,<3.12",
    package_dir={"vistax": "."},
    packages=["vistax"] + [f"vistax.{p}" for p in _SUBPACKAGES],
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax",
        "chex",
        "orbax-checkpoint==0.12.8",
        "ml_collections",
        "tensorflow-datasets==4.9.10",
        "array_record",
        "grain==0.2.18",
        "absl-py",
        "pillow",
        "numpy",
        "scikit-learn",  # the built-in `digits` dataset
        "tensorboardX",  # TensorBoard event files without TensorFlow
    ],
    extras_require={
        "tpu": ["jax[tpu]==0.10.2"],  # libtpu: TPU runs and ahead-of-time compiles from a CPU host
        "cuda": ["jax[cuda12]==0.10.2"],
        "test": ["pytest", "pytest-xdist", "scikit-image"],
        # Reference implementations for parity tests only (CPU build from this machine's disk).
        "torch": ["torch==2.13.0", "transformers", "safetensors"],
    },
    entry_points={"console_scripts": ["vistax = vistax.launch.cli:main"]},
)
