"""Base class of vistax's tfds builders: ArrayRecord files, written in generation order, no TF.

Images are stored encoded (PNG/JPEG bytes): without TensorFlow, tfds' `Image` feature only accepts
already-encoded bytes (or a path), and the `decode` pp op decodes them at read time.
"""
from __future__ import annotations

import contextlib
import io
import sys

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A `GeneratorBasedBuilder` that writes ArrayRecord files in the order examples are generated.

    Subclasses define `VERSION`, `_info` (via `make_info`), `_split_generators` and
    `_generate_examples`. Examples are written unshuffled (`disable_shuffling=True`): the
    generators already produce a fixed, seeded order, and training shuffles at read time.
    """

    # tfds derives a path to the builder's source code to look for a `checksums.tsv`; on
    # Python >= 3.9 that lookup imports `importlib_resources`, which tfds does not install.
    # vistax builders download nothing, so there are no checksums to find.
    code_path = None

    def __init__(self, *, data_dir: str, config: tfds.core.BuilderConfig | str | None = None):
        super().__init__(data_dir=data_dir, config=config, file_format="array_record")

    def prepare(self) -> str:
        """Writes the dataset unless it is already prepared; returns its version directory.

        tfds' progress bars (switched off for the process) and banners are replaced by one line
        on stderr.
        """
        if not self.is_prepared():
            print(f"vistax: preparing dataset {self.name} in {self.data_path} ...", file=sys.stderr)
            tfds.disable_progress_bar()
            with contextlib.redirect_stdout(io.StringIO()):
                self.download_and_prepare()
        return str(self.data_path)


def make_info(builder: tfds.core.DatasetBuilder, features: tfds.features.FeaturesDict,
              description: str) -> tfds.core.DatasetInfo:
    """DatasetInfo for `builder`, unshuffled on write.

    (`dataset_info_from_configs` would look for README/CITATIONS files next to the code.)
    """
    return tfds.core.DatasetInfo(
        builder=builder, description=description, features=features, disable_shuffling=True)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an HxW or HxWxC uint8 array; byte-identical for identical input.

    PIL writes no timestamp chunk, so the bytes depend only on the pixels and the zlib level.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8 pixels, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()
