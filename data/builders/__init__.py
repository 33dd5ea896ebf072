"""tfds builders of the built-in datasets (`digits`, `shapes`) and their shared base."""
