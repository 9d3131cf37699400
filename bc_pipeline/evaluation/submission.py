"""Package a trained classifier the way the course platform took it: ``model.py`` + the saved model.

A submission folder holds::

    model.keras        the network; it resizes and normalises raw 0..255 images by itself
    model.py           a standalone ``Model`` class (numpy + keras only, see MODEL_TEMPLATE)
    class_names.json   index -> class name, so predictions can be read without this package
    info.json          facts about the run (model name, classes, anything the caller adds)
    submission.zip     the four files above, ready to upload

The folder is written to a temporary sibling and renamed into place, so an interrupted export never
leaves a half-written submission that looks complete.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bc_pipeline.core.artifacts import MODEL_FILE
from bc_pipeline.core.storage import atomic_path, save_json

CLASS_NAMES_FILE, INFO_FILE = "class_names.json", "info.json"
SUBMISSION_FILES: tuple[str, ...] = ("model.py", MODEL_FILE, CLASS_NAMES_FILE, INFO_FILE)
ZIP_NAME = "submission.zip"

MODEL_TEMPLATE = '''\
"""Blood-cell image classifier, packaged for the course submission platform.

Interface (what the platform calls):

    model = Model()            # loads model.keras from the folder this file is in
    labels = model.predict(X)  # X: images (N, H, W, 3), pixel values 0..255 (the platform
                               # sends uint8 (N, 96, 96, 3)); returns int64 class indices (N,)

The saved network resizes and normalises the images itself, so no preprocessing happens here.
class_names.json, next to this file, maps each index to its class name. This file needs only
numpy and Keras 3: it must run where the training package is not installed.
"""

import os

import keras
import numpy as np

BATCH_SIZE = 256


class Model:
    def __init__(self):
        here = os.path.dirname(os.path.abspath(__file__))
        # compile=False: inference needs no optimizer or loss, and a custom training loss
        # would otherwise have to be importable here.
        self.model = keras.models.load_model(os.path.join(here, "model.keras"), compile=False)

    def predict(self, X):
        """Class indices (N,) int64 for images X (N, H, W, 3) with pixel values 0..255."""
        X = np.asarray(X)
        if X.ndim != 4 or X.shape[-1] != 3:
            raise ValueError(
                "Model.predict expects images of shape (N, H, W, 3) with RGB values 0..255, "
                "got an array of shape " + str(X.shape)
            )
        if not (np.issubdtype(X.dtype, np.integer) or np.issubdtype(X.dtype, np.floating)):
            raise ValueError("Model.predict expects numeric pixels, got dtype " + str(X.dtype))
        labels = [
            np.argmax(np.asarray(self.model.predict_on_batch(X[i : i + BATCH_SIZE].astype(np.float32))), axis=-1)
            for i in range(0, len(X), BATCH_SIZE)
        ]
        if not labels:
            return np.zeros((0,), dtype=np.int64)
        return np.concatenate(labels).astype(np.int64)
'''


def write_submission(
    model: Any,
    class_names: Sequence[str],
    folder: Path,
    *,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a submission folder for ``model`` at ``folder`` (replacing any old one); return it.

    ``class_names[i]`` names output ``i``; their count must match the model's outputs, because a
    mismatch would silently mislabel every prediction read back through class_names.json.
    """
    names = _checked_class_names(model, class_names)
    folder = Path(folder)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        model.save(tmp / MODEL_FILE)
        (tmp / "model.py").write_text(MODEL_TEMPLATE)
        save_json(tmp / CLASS_NAMES_FILE, names)
        save_json(tmp / INFO_FILE, _submission_info(model, names, info))
        _zip_files(tmp, SUBMISSION_FILES, tmp / ZIP_NAME)
    return folder


def _checked_class_names(model: Any, class_names: Sequence[str]) -> list[str]:
    names = [str(name) for name in class_names]
    outputs = model.output_shape[-1]
    if len(names) != outputs:
        raise ValueError(f"{len(names)} class names for a model with {outputs} outputs: {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique: {names}")
    return names


def _submission_info(model: Any, names: list[str], info: dict[str, Any] | None) -> dict[str, Any]:
    """The caller's info, with the facts this folder guarantees written last (they win)."""
    payload = dict(info or {})
    payload.setdefault("model_name", getattr(model, "name", "model"))
    payload.update(class_names=names, num_classes=len(names), submission_files=list(SUBMISSION_FILES))
    return payload


def _zip_files(folder: Path, names: Sequence[str], target: Path) -> None:
    # Flat arcnames: the platform unpacks the archive and imports model.py from its top level.
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in names:
            archive.write(folder / name, arcname=name)


def read_class_names(path: Path) -> list[str]:
    """The list in a class_names.json; ValueError naming the file if it is not a list of strings."""
    try:
        names = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{path}: expected a JSON list of class names")
    return names
