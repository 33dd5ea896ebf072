"""`vistax bench`: train-step, input-pipeline and checkpoint timings of the real objectives.

cases.py names the benchmarked configs (a config file and preset, overrides, the batch),
timing.py holds the protocol (warm-up, median of timed steps, the matmul peak),
torch_models.py (ViT, CLIP/SigLIP towers, shared blocks), torch_mae.py, torch_dino.py and
torch_perceiver.py the PyTorch equivalents timed beside them and torch_trainers.py their
training steps, linen_vit.py the big_vision-style ViT, pipeline_bench.py and
checkpoint_bench.py the input pipeline and the blocking time of a checkpoint save, run.py the
driver behind the command and report.py the table and the JSON file.
"""
