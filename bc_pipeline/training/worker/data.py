"""The training input pipeline in numpy: batches drawn from memory-mapped uint8 shards.

No ``tf.data`` and no TensorFlow: the same code feeds Keras on TensorFlow, JAX or PyTorch.
:class:`TrainingBatches` is a ``keras.utils.PyDataset``; its ``__getitem__(i)`` builds batch ``i``
on its own (its random draws are seeded by the batch index), so Keras' worker threads can build
several batches at once and the order of the batches never depends on the threads.

Every augmentation works on a whole batch at once (vectorised numpy):

- flips and 90-degree turns: a blood cell has no preferred orientation, so the eight symmetries
  of the square are all valid, exact and cheap;
- template superimposition: ``(1 - w) x + w T_k``, the overlay of the course's corrupted images;
- MixUp and CutMix: images *and* one-hot labels mixed with a partner from the same batch.

Images stay uint8 end to end (a quarter of float32's bytes to copy and to send to the GPU); the
model casts and normalises them itself (see :mod:`bc_pipeline.models.zoo`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bc_pipeline.training.settings import TrainingSettings

BATCH_AUGMENTS = ("none", "mixup", "cutmix", "mixup+cutmix")
MIXUP_ALPHA = 0.2  # keras-cv's MixUp default: most pairs stay close to one of the two images
CUTMIX_ALPHA = 1.0  # Keras' CutMix default: the patch's area share is uniform on (0, 1)


class ImagePool:
    """Several (images, labels) arrays seen as one, gathered without concatenating them.

    The arrays may be memory-mapped ``.npy`` shards: only the rows a batch asks for are read.
    """

    def __init__(self, parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        if not parts:
            raise ValueError("the training pool is empty: no arrays to draw from")
        self.images = [x for x, _ in parts]
        self.labels = np.concatenate([np.asarray(y, np.int64).reshape(-1) for _, y in parts])
        sizes = [len(x) for x in self.images]
        for (x, y), size in zip(parts, sizes):
            if len(np.asarray(y).reshape(-1)) != size:
                raise ValueError(f"an array of the pool has {size} images but {len(y)} labels")
        shapes = {tuple(x.shape[1:]) for x in self.images}
        if len(shapes) != 1:
            raise ValueError(f"the pool's arrays have different image shapes: {sorted(shapes)}")
        self.image_shape: tuple[int, ...] = shapes.pop()
        self.starts = np.concatenate([[0], np.cumsum(sizes)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) at global ``rows``, returned in ascending row order.

        A batch is a random set, so its order does not matter; ascending rows make each array's
        read one sequential pass (``np.take`` on a memory map), several times faster than gathering
        in the drawn order.
        """
        rows = np.sort(rows)
        cuts = np.searchsorted(rows, self.starts[1:-1])
        pieces = [
            np.take(self.images[k], part - self.starts[k], axis=0)
            for k, part in enumerate(np.split(rows, cuts))
            if len(part)
        ]
        return (pieces[0] if len(pieces) == 1 else np.concatenate(pieces)), self.labels[rows]


# The 8 symmetries of the square as (quarter turns, mirror); pixels are moved as 3-byte units.
SYMMETRIES: tuple[tuple[int, bool], ...] = tuple((turns, mirror) for mirror in (False, True) for turns in range(4))


def flip_and_turn(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image under one of the 8 symmetries of the square, each drawn with probability 1/8.

    The batch is cut into 8 runs of multinomial lengths, one symmetry per run in a random order,
    so each transform is one strided copy of a contiguous block. Pixels are viewed as single
    3-byte items: numpy then moves 1 item per pixel instead of 3 bytes one by one (measured 1.8x
    faster on 96 px RGB).
    """
    n = len(images)
    pixels = _pixel_view(np.ascontiguousarray(images))
    out = np.empty_like(images)
    out_pixels = _pixel_view(out)
    counts = rng.multinomial(n, [1 / 8] * 8)
    start = 0
    for index, count in zip(rng.permutation(8), counts):
        if count:
            turns, mirror = SYMMETRIES[index]
            block = np.rot90(pixels[start : start + count], turns, axes=(1, 2))
            out_pixels[start : start + count] = block[:, ::-1] if mirror else block
            start += count
    return out


def _pixel_view(images: np.ndarray) -> np.ndarray:
    return images.view(np.dtype((np.void, images.shape[-1] * images.itemsize)))[..., 0]


def blend_templates(
    images: np.ndarray, templates: np.ndarray, rng: np.random.Generator, probability: float, max_weight: float
) -> np.ndarray:
    """``(1 - w) x + w T_k`` for a random template k and w ~ U(0, max_weight), on a share of the images."""
    on = rng.random(len(images)) < probability
    if not on.any():
        return images
    where = np.flatnonzero(on)
    weight = rng.uniform(0.0, max_weight, (len(where), 1, 1, 1)).astype(np.float32)
    chosen = templates[rng.integers(0, len(templates), len(where))].astype(np.float32)
    out = images.copy()
    out[where] = _to_uint8((1.0 - weight) * images[where] + weight * chosen)
    return out


def mixup(
    images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, alpha: float = MIXUP_ALPHA
) -> tuple[np.ndarray, np.ndarray]:
    """MixUp: each image mixed with a partner of the batch, ``lam x + (1 - lam) x'``, labels alike.

    ``lam`` ~ Beta(alpha, alpha) per image. Computed in place as ``x + (1 - lam)(x' - x)`` on flat
    rows (float32): a convex mix stays in 0..255, so rounding is the only conversion needed.
    """
    n = len(images)
    partner = rng.permutation(n)
    lam = rng.beta(alpha, alpha, n).astype(np.float32)[:, None]
    flat = images.reshape(n, -1)
    mixed = flat[partner].astype(np.float32)
    mixed -= flat
    mixed *= 1.0 - lam
    mixed += flat
    np.rint(mixed, out=mixed)
    return mixed.astype(np.uint8).reshape(images.shape), lam * labels + (1.0 - lam) * labels[partner]


def cutmix(
    images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, alpha: float = CUTMIX_ALPHA
) -> tuple[np.ndarray, np.ndarray]:
    """CutMix: a box of a partner image pasted in; labels mixed by the box's area *inside* the image.

    The box has sides ``sqrt(1 - lam)`` of the image's and a uniform centre, and is clipped at the
    border; the label share is the clipped area, as in Keras' CutMix.
    """
    n, height, width = images.shape[:3]
    partner = rng.permutation(n)
    side = np.sqrt(1.0 - rng.beta(alpha, alpha, n))
    centre_y, centre_x = rng.uniform(0, height, n), rng.uniform(0, width, n)
    y0 = np.clip(np.round(centre_y - side * height / 2), 0, height).astype(int)
    y1 = np.clip(np.round(centre_y + side * height / 2), 0, height).astype(int)
    x0 = np.clip(np.round(centre_x - side * width / 2), 0, width).astype(int)
    x1 = np.clip(np.round(centre_x + side * width / 2), 0, width).astype(int)
    mixed = images.copy()
    for i in range(n):  # one slice copy per image: far cheaper than a full-batch mask
        mixed[i, y0[i] : y1[i], x0[i] : x1[i]] = images[partner[i], y0[i] : y1[i], x0[i] : x1[i]]
    share = ((y1 - y0) * (x1 - x0) / (height * width)).astype(np.float32)[:, None]
    return mixed, (1.0 - share) * labels + share * labels[partner]


def select_rows(
    images: np.ndarray, labels: np.ndarray, augmented: Sequence[tuple[np.ndarray, np.ndarray]], rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """``rows`` of the training set and of each stored copy (shards follow the set's rows, copy by copy)."""
    selected = [(np.asarray(images[rows]), np.asarray(labels)[rows])]
    offset, copy_x, copy_y = 0, [], []
    for shard_x, shard_y in augmented:
        copy_x.append(shard_x)
        copy_y.append(np.asarray(shard_y))
        offset += len(shard_y)
        if offset == len(labels):  # one whole copy: take the rows
            x = copy_x[0] if len(copy_x) == 1 else np.concatenate([np.asarray(c) for c in copy_x])
            selected.append((np.asarray(x[rows]), np.concatenate(copy_y)[rows]))
            offset, copy_x, copy_y = 0, [], []
    if offset:
        raise ValueError(f"the augmented shards hold {offset} rows past a whole number of copies of {len(labels)} images")
    return selected[0][0], selected[0][1], selected[1:]


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[labels]


def _keras_py_dataset() -> type:
    import keras

    return keras.utils.PyDataset


class _Schedule:
    """Which pool rows batch ``i`` holds: consecutive slices of a fresh permutation per pass.

    Pass k over the pool is ``permutation_k`` of a generator seeded by (seed, k), so every image is
    drawn once per pass (an epoch-style shuffle) and any batch can be computed from its index.
    """

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _permutation(self, k: int) -> np.ndarray:
        with self._lock:
            if k not in self._cache:
                if len(self._cache) > 4:
                    self._cache.pop(min(self._cache))
                self._cache[k] = np.random.default_rng([self.seed, k]).permutation(self.size)
            return self._cache[k]

    def rows(self, index: int) -> np.ndarray:
        start = index * self.batch_size
        positions = np.arange(start, start + self.batch_size)
        passes = positions // self.size
        rows = np.empty(self.batch_size, np.int64)
        for k in np.unique(passes):
            where = passes == k
            rows[where] = self._permutation(int(k))[positions[where] - k * self.size]
        return rows


@dataclass(frozen=True, eq=False)  # eq=False: templates are an array
class BatchRecipe:
    """How training batches are made: the input pipeline's settings as one value.

    :meth:`from_settings` takes them from a run's :class:`TrainingSettings` (what the trainer does);
    the defaults are that dataclass's own, so a recipe made by hand with only ``num_classes`` makes
    the batches default settings make. ``templates`` None: no template superimposition.
    """

    num_classes: int
    batch_size: int = TrainingSettings.batch_size
    seed: int = TrainingSettings.seed
    augment: bool = TrainingSettings.augment
    templates: np.ndarray | None = None
    template_probability: float = TrainingSettings.template_probability
    template_max_weight: float = TrainingSettings.template_max_weight
    batch_augment: str = TrainingSettings.batch_augment
    batch_augment_probability: float = TrainingSettings.batch_augment_probability

    def __post_init__(self) -> None:
        if self.batch_augment not in BATCH_AUGMENTS:
            raise ValueError(f"unknown batch augmentation {self.batch_augment!r}; use one of {', '.join(BATCH_AUGMENTS)}")

    @classmethod
    def from_settings(cls, settings: TrainingSettings, num_classes: int, templates: np.ndarray | None = None) -> BatchRecipe:
        return cls(
            num_classes=num_classes, batch_size=settings.batch_size, seed=settings.seed, augment=settings.augment,
            templates=templates, template_probability=settings.template_probability,
            template_max_weight=settings.template_max_weight, batch_augment=settings.batch_augment,
            batch_augment_probability=settings.batch_augment_probability,
        )  # fmt: skip


def training_batches(pool: ImagePool, recipe: BatchRecipe, *, workers: int = 1) -> object:
    """An endless ``PyDataset`` of (uint8 images, one-hot float32 labels) batches from ``pool``.

    ``workers`` > 1 builds that many batches at once in threads: numpy releases the GIL in the
    copies and arithmetic that make up a batch. Give ``steps_per_epoch`` to ``fit``.
    """
    base = _keras_py_dataset()

    class TrainingBatches(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=max(8, 2 * workers))
            self.schedule = _Schedule(len(pool), recipe.batch_size, recipe.seed)

        @property
        def num_batches(self) -> None:
            return None  # endless: the epoch length is fit's steps_per_epoch

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
            return make_batch(pool, self.schedule.rows(index), np.random.default_rng([recipe.seed, 1, index]), recipe)

    return TrainingBatches()


def view_batches(
    originals: np.ndarray, copies: Sequence[np.ndarray], labels: np.ndarray, recipe: BatchRecipe, *, workers: int = 1
) -> object:
    """An endless ``PyDataset`` of ``[clean; view 1; view 2]`` batches for AugMix's consistency loss.

    Batch ``i`` draws ``recipe.batch_size`` rows of the training set (a fresh permutation per pass,
    as :func:`training_batches`), then the same rows of two different stored augmented copies, so
    the three blocks show the same cells; labels are repeated three times. Flips and turns (when
    ``recipe.augment``) are drawn per image and block; the recipe's mixing and templates do not apply.
    """
    if len(copies) < 2:
        raise ValueError(f"the consistency loss needs at least 2 stored augmented copies, found {len(copies)}: "
                         "raise augmented_train_set's copies")  # fmt: skip
    labels = np.asarray(labels, np.int64)
    base = _keras_py_dataset()

    class ViewBatches(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=max(8, 2 * workers))
            self.schedule = _Schedule(len(labels), recipe.batch_size, recipe.seed)

        @property
        def num_batches(self) -> None:
            return None

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
            rows = np.sort(self.schedule.rows(index))
            rng = np.random.default_rng([recipe.seed, 2, index])
            first, second = rng.choice(len(copies), size=2, replace=False)
            blocks = [np.take(source, rows, axis=0) for source in (originals, copies[first], copies[second])]
            if recipe.augment:
                blocks = [flip_and_turn(block, rng) for block in blocks]
            target = one_hot(labels[rows], recipe.num_classes)
            return np.concatenate(blocks), np.concatenate([target] * 3)

    return ViewBatches()


def make_batch(pool: ImagePool, rows: np.ndarray, rng: np.random.Generator, recipe: BatchRecipe) -> tuple[np.ndarray, np.ndarray]:
    """One training batch: gather, flip/turn, overlay templates, then maybe MixUp or CutMix."""
    images, labels = pool.gather(rows)
    labels = one_hot(labels, recipe.num_classes)
    if recipe.augment:
        images = flip_and_turn(images, rng)
    if recipe.templates is not None and len(recipe.templates):
        images = blend_templates(images, recipe.templates, rng, recipe.template_probability, recipe.template_max_weight)
    if recipe.batch_augment != "none" and rng.random() < recipe.batch_augment_probability:
        images, labels = mix_batch(recipe.batch_augment, images, labels, rng)
    return images, labels


def mix_batch(
    name: str, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """MixUp, CutMix, or for ``mixup+cutmix`` one of the two drawn for this batch."""
    if name not in BATCH_AUGMENTS or name == "none":
        raise ValueError(f"unknown batch augmentation {name!r}; use mixup, cutmix or mixup+cutmix")
    kinds = name.split("+")
    kind = kinds[int(rng.integers(0, len(kinds)))]
    return (mixup if kind == "mixup" else cutmix)(images, labels, rng)


def evaluation_batches(
    images: np.ndarray, labels: np.ndarray, *, num_classes: int, batch_size: int, repeat: int = 1
) -> object:
    """A finite ``PyDataset`` of (uint8 images, one-hot labels) in order, for validation.

    ``repeat`` > 1 stacks each batch that many times, the shape of :func:`view_batches`' batches
    (a consistency loss sees identical views, so only its cross-entropy is left).
    """
    base = _keras_py_dataset()
    count = len(images)

    class EvaluationBatches(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__(workers=1, use_multiprocessing=False)

        @property
        def num_batches(self) -> int:
            return -(-count // batch_size)

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
            part = slice(index * batch_size, min(count, (index + 1) * batch_size))
            x, y = np.asarray(images[part]), one_hot(np.asarray(labels[part], np.int64), num_classes)
            return (x, y) if repeat == 1 else (np.concatenate([x] * repeat), np.concatenate([y] * repeat))

    return EvaluationBatches()


def feed(dataset: object, backend: str, *, workers: int = 1) -> object:
    """What ``fit`` gets: the ``PyDataset`` itself, or on TensorFlow, a ``tf.data`` map over batch indices.

    Keras hands a ``PyDataset`` to TensorFlow through ``tf.data.Dataset.from_generator``, which here
    cost 40 % more per training step than the same batches from a tensor dataset (measured:
    410 against 280 ms per custom_cnn step on 2 cores). Mapping ``tf.numpy_function`` over the
    batch indices calls the same ``__getitem__`` (the same numpy code, the same batches) at
    the tensor dataset's speed (262 ms). Other backends take the ``PyDataset`` as it is.
    """
    if backend != "tensorflow":
        return dataset
    import tensorflow as tf

    images, labels = dataset[0]  # type: ignore[index]
    shapes = ((None, *images.shape[1:]), (None, *labels.shape[1:]))
    types = (tf.as_dtype(images.dtype), tf.as_dtype(labels.dtype))
    count = dataset.num_batches  # type: ignore[attr-defined]

    def batch(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return dataset[int(index)]  # type: ignore[index]

    def shaped(x: object, y: object) -> tuple[object, object]:
        return tf.ensure_shape(x, shapes[0]), tf.ensure_shape(y, shapes[1])

    indices = tf.data.Dataset.range(count if count is not None else 2**62)
    data = indices.map(lambda i: tf.numpy_function(batch, [i], types, stateful=False),
                       num_parallel_calls=max(1, workers), deterministic=True)  # fmt: skip
    return data.map(shaped).prefetch(2)
