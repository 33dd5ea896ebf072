"""Flax NNX modules only: no training logic, nothing imported from train/.

Parameters carry logical axis names (`out_sharding` metadata); the trainer turns them into
shardings with the config's rule table and places them through jit's out_shardings. Flax's eager
sharding would instead demand a mesh whenever a model is built, even on one device, so vistax
switches it off.
"""

from flax import nnx

nnx.use_eager_sharding(False)
