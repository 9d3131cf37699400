"""Classify new, unlabelled images with a saved model: the logic behind ``bc-predict``.

A model can be given as a trained-model artifact folder (``model.keras`` + ``info.json``), a
submission folder (``model.keras`` + ``class_names.json``, see :mod:`bc_pipeline.evaluation.submission`)
or a bare ``.keras`` file. Images can be a folder of image files (searched recursively) or an
``.npz`` array file. Keras is imported only when a model is loaded, so bad arguments fail fast.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bc_pipeline.core.artifacts import MODEL_FILE
from bc_pipeline.evaluation.submission import CLASS_NAMES_FILE, INFO_FILE, read_class_names
from bc_pipeline.ingest.decode import read_image_file, to_rgb_square
from bc_pipeline.ingest.loaders import ImageSourceError, _open_npz
from bc_pipeline.training.model_folder import RECORD_FILE, read_record

# Keys tried in order for the images of an .npz: the challenge layout, then common test-set names.
NPZ_IMAGE_KEYS: tuple[str, ...] = ("images", "X", "x", "test_set", "data")


@dataclass(frozen=True)
class NewImages:
    """Images (N, S, S, 3) uint8, where each came from, and what was skipped and why."""

    images: np.ndarray
    sources: list[str]
    skipped: list[tuple[str, str]]


# --- models ------------------------------------------------------------------------------------


def locate_model(path: str | Path) -> Path:
    """The ``.keras`` file that ``path`` designates; checked without loading Keras."""
    path = Path(path)
    if path.is_dir():
        model_file = path / MODEL_FILE
        if not model_file.is_file():
            raise FileNotFoundError(
                f"{path}: folder has no model.keras (expected a trained-model artifact or a submission folder)"
            )
        return model_file
    if not path.exists():
        raise FileNotFoundError(f"{path}: model not found (no such file or folder)")
    if path.suffix.lower() != ".keras":
        raise ValueError(f"{path}: not a model; give a .keras file or a folder that holds model.keras")
    return path


def load_classifier(path: str | Path) -> tuple[Any, list[str]]:
    """The Keras model at ``path`` and its class names (``class_0``.. when none are stored)."""
    model_file = locate_model(path)
    model = _load_keras(model_file)
    outputs = model.output_shape
    if len(outputs) != 2:
        raise ValueError(f"{model_file}: output shape {outputs} is not (N, classes); not a classifier")
    names = stored_class_names(model_file.parent)
    if names is None:
        return model, [f"class_{i}" for i in range(outputs[-1])]
    if len(names) != outputs[-1]:
        raise ValueError(f"{model_file}: {len(names)} stored class names for a model with {outputs[-1]} outputs")
    return model, names


def stored_class_names(folder: Path) -> list[str] | None:
    """Class names from ``class_names.json`` (a submission) or else the model record (a model folder); None if neither."""
    if (folder / CLASS_NAMES_FILE).is_file():
        return read_class_names(folder / CLASS_NAMES_FILE)
    if not (folder / RECORD_FILE).is_file():
        return None
    return list(read_record(folder).class_names)


def stored_temperature(folder: Path) -> float:
    """The calibration temperature stored with the model (1.0, no scaling, when none is).

    The training worker fits it on the validation split (models.calibration) and the model record
    keeps it; a submission folder carries it over from its model in its ``info.json``.
    """
    folder = Path(folder)
    if not (folder / CLASS_NAMES_FILE).is_file():  # a model folder: its record
        record = read_record(folder) if (folder / RECORD_FILE).is_file() else None
        return float(record.temperature) if record and record.temperature else 1.0
    info_file = folder / INFO_FILE
    if not info_file.is_file():
        return 1.0
    try:
        value = json.loads(info_file.read_text()).get("temperature", 1.0)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return 1.0  # the temperature only refines the probabilities; the classes stand without it
    if not isinstance(value, (int, float)) or not 0 < value < 1e3:
        raise ValueError(f"{info_file}: 'temperature' must be a positive number, got {value!r}")
    return float(value)


def _load_keras(model_file: Path) -> Any:
    import keras

    try:
        # compile=False: prediction needs no optimizer, and a custom training loss need not resolve.
        return keras.saving.load_model(model_file, compile=False)
    except Exception as error:  # noqa: BLE001 - Keras raises many types for a file it cannot read
        raise ValueError(f"{model_file}: not a loadable Keras model ({type(error).__name__}: {error})") from None


# --- images ------------------------------------------------------------------------------------


def read_new_images(path: str | Path, image_size: int = 96) -> NewImages:
    """Images from a folder (recursive) or an ``.npz``, as RGB uint8 at ``image_size``."""
    path = Path(path)
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    if path.is_dir():
        return _read_folder(path, image_size)
    if not path.exists():
        raise FileNotFoundError(f"{path}: input not found (no such file or folder)")
    if path.suffix.lower() == ".npz":
        return _read_npz(path, image_size)
    raise ValueError(f"{path}: not an image source; give a folder of images or an .npz file")


def _read_folder(root: Path, image_size: int) -> NewImages:
    """Every file below ``root`` is read or reported as skipped: nothing is dropped silently."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    sources = [file.relative_to(root).as_posix() for file in files]
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda file: _read_one(root, file, image_size), files))
    images, kept, skipped = [], [], []
    for source, (pixels, info) in zip(sources, results):
        if pixels is None:
            skipped.append((source, info))
        else:
            images.append(pixels)
            kept.append(source)
    if not images:
        raise ImageSourceError(f"{root}: no readable images ({_skip_summary(skipped)})")
    return NewImages(np.stack(images).astype(np.uint8, copy=False), kept, skipped)


def _read_one(root: Path, file: Path, image_size: int) -> tuple[np.ndarray | None, str]:
    # Hidden folders (.git, .ipynb_checkpoints) hold copies and metadata, not images to classify.
    if any(part.startswith(".") for part in file.relative_to(root).parent.parts):
        return None, "inside a hidden folder, not read"
    return read_image_file(file, image_size)


def _skip_summary(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return "the folder has no files"
    reasons = pd.Series([reason for _, reason in skipped]).value_counts().head(3).to_dict()
    return f"{len(skipped)} files skipped: {reasons}"


def _read_npz(path: Path, image_size: int) -> NewImages:
    arrays = _open_npz(path)
    key = _image_key(path, arrays)
    images = _to_uint8(arrays[key], f"{path}: array {key!r}")
    resized = np.stack([to_rgb_square(image, image_size) for image in images])
    return NewImages(resized, [f"{path.name}[{i}]" for i in range(len(images))], [])


def _image_key(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """The preferred key if present, else the only 4-D array; an error listing the keys otherwise."""
    for key in NPZ_IMAGE_KEYS:
        if key in arrays:
            return key
    candidates = [key for key, array in arrays.items() if array.ndim == 4]
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(f"{key!r} {array.dtype}{array.shape}" for key, array in arrays.items()) or "nothing"
    why = "several 4-D arrays" if candidates else "no image array"
    raise ImageSourceError(
        f"{path}: {why}; expected key {' / '.join(map(repr, NPZ_IMAGE_KEYS))} or a single (N, H, W, 3) array "
        f"(found: {found})"
    )


def _to_uint8(images: np.ndarray, where: str) -> np.ndarray:
    """Pixels as uint8: floats in [0, 1] are scaled to 0..255, other values must lie in 0..255."""
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise ImageSourceError(f"{where}: shape is {images.shape}, expected (N, H, W, 3), (N, H, W, 1) or (N, H, W)")
    if len(images) == 0:
        raise ImageSourceError(f"{where}: holds no images")
    if images.dtype == np.uint8:
        return images
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise ImageSourceError(f"{where}: dtype is {images.dtype}, expected numeric pixels")
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        raise ImageSourceError(f"{where}: holds NaN or infinite values")
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > 255:
        raise ImageSourceError(f"{where}: values span {low:g}..{high:g}, expected 0..255 (or 0..1 for floats)")
    if np.issubdtype(images.dtype, np.floating) and high <= 1.0:
        images = images * 255.0
    return np.rint(images).astype(np.uint8)


# --- predictions -------------------------------------------------------------------------------


def predict_frame(
    model: Any,
    images: np.ndarray,
    sources: Sequence[str],
    class_names: Sequence[str],
    batch_size: int = 256,
    temperature: float = 1.0,
) -> pd.DataFrame:
    """One row per image: source, predicted_index, predicted_class, then ``p_<class>`` per class.

    The probabilities are divided by ``temperature`` in log space (models.calibration), which
    changes how sure they are, never which class wins.
    """
    from bc_pipeline.models.calibration import scale_probabilities
    from bc_pipeline.models.inference import predict_proba

    if len(sources) != len(images):
        raise ValueError(f"{len(sources)} sources for {len(images)} images")
    probabilities = predict_proba(model, images, batch_size=batch_size)
    if probabilities.shape[1] != len(class_names):
        raise ValueError(f"{len(class_names)} class names for a model with {probabilities.shape[1]} outputs")
    probabilities = scale_probabilities(probabilities, temperature)
    predicted = probabilities.argmax(axis=1).astype(np.int64)
    frame = pd.DataFrame(
        {
            "source": list(sources),
            "predicted_index": predicted,
            "predicted_class": np.asarray(class_names, dtype=object)[predicted],
        }
    )
    columns = pd.DataFrame(probabilities, columns=[f"p_{name}" for name in class_names])
    return pd.concat([frame, columns], axis=1)
