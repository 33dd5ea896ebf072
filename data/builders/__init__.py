"""tfds builders of the built-in datasets (`digits`, `shapes`, `docs`) and their shared base."""
