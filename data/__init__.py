"""Data: tfds builders written as ArrayRecord, read through tfds data sources + grain, no TF.

- `pipeline`: `train_iterator`, `eval_iterator`, `dataset_info` (the trainer's and evaluators' API)
- `preprocess`: big_vision-style pp strings and the registry of ops
- `prepare`: `vistax prepare` (class folders, CSV/TSV of image + caption -> dataset)
- `builtins`: built-in datasets `digits`, `shapes` and `docs` (text), prepared on demand
- `multicrop`, `text_audio`: more pp ops (DINO views; text windows, log-mel spectrograms)
- `builders/`: the tfds builders
"""
