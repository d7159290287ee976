"""Tiny stand-ins for tfds' mnist, fashion_mnist and cifar10, prepared on disk by tfds itself.

Subclasses of tfds' own builders whose split generators yield synthetic PNG images instead of downloading, written in
array_record format, so the directory layout, metadata and records are exactly those of the real prepared data sets,
and they load without the network or TensorFlow.
"""

import io

import numpy as np

# name -> the image shape of the real data set.
FAKE_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


def fake_images(name, split, size):
    """``size`` deterministic uint8 images; example ``i`` has label ``i % 10`` (seeded from the name's bytes and the
    size: ``hash`` is salted)."""
    seed = [int.from_bytes(name.encode(), "little") % 2**32, size]
    return np.random.default_rng(seed).integers(0, 256, (size, *FAKE_SHAPES[name]), dtype=np.uint8)


def png(image):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def prepare_fake_tfds(name, data_dir, sizes):
    """Prepares ``name`` with ``sizes[split]`` examples per split in tfds' array_record layout under ``data_dir``."""
    import tensorflow_datasets as tfds

    # tfds encodes numpy images with TensorFlow, so the generators hand it PNG bytes, which it stores as they are.
    def generate(split):
        for index, image in enumerate(fake_images(name, split, sizes[split])):
            example = {"image": png(image), "label": index % 10}
            if name == "cifar10":
                example["id"] = f"{split}_{index:05d}"
            yield index, example

    # Resolved outside `skip_registration`: the first look-up imports (and registers) tfds' own builders.
    base = tfds.builder_cls(name)
    with tfds.core.registered.skip_registration():

        class Fake(base):
            def _split_generators(self, dl_manager):
                del dl_manager
                return {split: generate(split) for split in sizes}

        Fake.name = name
    builder = Fake(data_dir=data_dir)
    builder.download_and_prepare(
        file_format="array_record", download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return builder
