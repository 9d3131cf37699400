"""Lab-like shifts of the test split: what differs between two laboratories' smears.

The ImageNet-C suite (``imagenet_c``) corrupts one lab's images: noise, blur, JPEG, weather. A cell
from another laboratory differs in other ways, and models that hold the suite fall to chance there
(docs/domain_shift.md). The ``domain_shift_set`` asset scores every model on the test split under
four such differences, at severities 1-5, plus all four at once:

- ``stain``: another Romanowsky formulation and staining time. The image is separated into dye
  amounts by colour deconvolution (Ruifrok and Johnston, 2001; optical density = -ln(I / 256)),
  each of the two main dyes' colour vectors is turned by up to 20 degrees towards a random
  direction and its amount scaled by up to +-50 %, and the image is put back together: nuclei and
  granules change hue and depth, as between two labs, and not as a global RGB tint.
- ``white_balance``: another lamp and camera white balance: per-channel gains in linear light
  (warmer or cooler, a green tint) and another exposure.
- ``framing``: another crop. The other lab's crops are tight around the cell, where PBC's show
  background around it: the cell is enlarged by up to 1.8x and moved off centre.
- ``optics``: another objective and sensor: fewer pixels across the cell (down- and upsampled),
  lateral chromatic aberration (red and blue planes magnified apart), and a camera's sharpening.
- ``lab``: all four, each at the same severity (the order light meets them: smear, lamp, camera, crop).

None of them is a training augmentation. :data:`PRESET_RESEMBLANCE` names the training presets
that come close to each (as ``imagenet_c.PRESET_OVERLAPS`` does for the suite), so a report can
say which scores are not robust numbers. Pure numpy and Pillow: no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from bc_pipeline.core.settings import declare

SHIFTS: tuple[str, ...] = ("stain", "white_balance", "framing", "optics", "lab")
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
MANIFEST_COLUMNS = ["shift", "severity", "clean_index", "label"]

# Training presets (augmentation.presets) with an op close to a shift: a model trained on one has
# seen that shift in part. "lab" combines all four, so it counts as seen only if all four are.
PRESET_RESEMBLANCE: dict[str, tuple[str, ...]] = {
    "light": ("framing",),  # zoom +-15 %
    "categorical": ("framing", "white_balance"),  # zoom +-20 %, hue/saturation/brightness
    "randaugment": ("white_balance",),
    "strong": ("white_balance",),
    "illumination": ("white_balance", "stain"),  # exposure, gamma, RGB stain tints
    "focus": ("optics",),  # blur, not sampling or aberration, but close at low severity
    "stain": ("stain",),  # dye amounts scaled, though not the dyes' colours turned
    "scale": ("framing",),
}

# Per severity 1-5.
_STAIN_TURN_DEGREES = (4.0, 8.0, 12.0, 16.0, 20.0)
_STAIN_AMOUNT = (0.1, 0.2, 0.3, 0.4, 0.5)
_WHITE_BALANCE = (0.06, 0.12, 0.18, 0.24, 0.30)  # log-gain of red against blue, and of exposure
_ZOOM = (1.15, 1.3, 1.45, 1.6, 1.8)
_RESOLUTION = (1.25, 1.5, 1.75, 2.0, 2.5)  # downsampling factor
_ABERRATION = (0.01, 0.02, 0.03, 0.04, 0.05)  # relative magnification of red against blue
_SHARPEN = (30, 60, 90, 120, 150)  # unsharp-mask percent

# Colour vectors (optical density per RGB channel) of haematoxylin, eosin and DAB (Ruifrok and
# Johnston; scikit-image's rgb_from_hed): a basis in which blue-purple and pink dyes separate.
_DYES = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_DYES = _DYES / np.linalg.norm(_DYES, axis=1, keepdims=True)
_FROM_OD = np.linalg.inv(_DYES)


def check_shifts(names: Iterable[str], severities: Iterable[int]) -> None:
    """Refuse unknown shift names and severities outside 1-5, before any work starts."""
    unknown = [name for name in names if name not in SHIFTS]
    if unknown:
        raise ValueError(f"unknown lab shift(s) {', '.join(unknown)}; choose from {', '.join(SHIFTS)}")
    wrong = [s for s in severities if s not in SEVERITIES]
    if wrong:
        raise ValueError(f"lab-shift severities must be in 1-5, got {wrong}")


@dataclass(frozen=True)
class ShiftSettings:
    """Which shifts and severities, on how many test images (the ``domain_shift_set`` asset's config)."""

    shifts: tuple[str, ...] = declare(SHIFTS, "Lab-like shifts: stain, white_balance, framing, optics, lab (all four).")
    severities: tuple[int, ...] = declare((1, 3, 5), "Severities 1-5.")
    max_images: int = declare(1000, "Test images, stratified by class (0: the whole split).", ge=0)
    seed: int = declare(3)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shifts", tuple(self.shifts))
        object.__setattr__(self, "severities", tuple(self.severities))
        check_shifts(self.shifts, self.severities)


def stain(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Another staining: the two dyes' colour vectors turned and their amounts scaled (float RGB in [0, 255])."""
    amounts = -np.log((image + 1.0) / 256.0) @ _FROM_OD
    dyes = _DYES.copy()
    angle = np.deg2rad(_STAIN_TURN_DEGREES[severity - 1])
    for k in (0, 1):
        direction = rng.normal(size=3)
        direction -= direction @ dyes[k] * dyes[k]
        turned = np.cos(angle) * dyes[k] + np.sin(angle) * direction / np.linalg.norm(direction)
        dyes[k] = np.clip(turned, 0.01, None) / np.linalg.norm(np.clip(turned, 0.01, None))
    scale = 1.0 + rng.uniform(-1, 1, 2) * _STAIN_AMOUNT[severity - 1]
    amounts[..., :2] *= scale
    return 256.0 * np.exp(-(amounts @ dyes)) - 1.0


def white_balance(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Another lamp and white balance: warmer or cooler, a green tint and another exposure, in linear light."""
    strength = _WHITE_BALANCE[severity - 1]
    warm = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0) * strength
    tint = rng.uniform(-1, 1) * strength / 3
    exposure = rng.uniform(-1, 1) * strength
    gains = np.exp(np.array([warm, tint, -warm]) + exposure)
    linear = (np.clip(image, 0, 255) / 255.0) ** 2.2
    return 255.0 * np.clip(linear * gains, 0, 1) ** (1 / 2.2)


def framing(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Another crop: the cell enlarged by the severity's zoom and moved off centre by up to a quarter of the slack."""
    size = image.shape[0]
    window = size / _ZOOM[severity - 1]
    slack = (size - window) / 2
    cx, cy = size / 2 + rng.uniform(-0.5, 0.5, 2) * slack
    box = (cx - window / 2, cy - window / 2, cx + window / 2, cy + window / 2)
    return np.asarray(_pil(image).resize((size, size), Image.Resampling.BILINEAR, box=box), np.float32)


def optics(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Another objective and camera: fewer pixels, red and blue magnified apart, then sharpened."""
    size = image.shape[0]
    small = max(8, round(size / (_RESOLUTION[severity - 1] * rng.uniform(0.9, 1.1))))
    picture = _pil(image).resize((small, small), Image.Resampling.BOX).resize((size, size), Image.Resampling.BILINEAR)
    planes = list(picture.split())
    spread = _ABERRATION[severity - 1]
    planes[0], planes[2] = _magnify(planes[0], 1 + spread), _magnify(planes[2], 1 / (1 + spread))
    sharpened = Image.merge("RGB", planes).filter(ImageFilter.UnsharpMask(radius=1.0, percent=_SHARPEN[severity - 1], threshold=0))
    return np.asarray(sharpened, np.float32)


def lab(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """All four, in the order light meets them: the smear's stain, the lamp, the camera, the crop."""
    for step in (stain, white_balance, optics, framing):
        image = np.clip(step(image, severity, rng), 0, 255)
    return image


_SHIFT_FUNCTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "stain": stain, "white_balance": white_balance, "framing": framing, "optics": optics, "lab": lab,
}  # fmt: skip


def shift_images(images: np.ndarray, shift: str, severity: int, *, seed: int) -> np.ndarray:
    """``images`` (N, H, W, 3) uint8 under ``shift`` at ``severity``; image ``i`` draws from its own stream.

    Each image's parameters come from ``(seed, shift, severity, i)``, so the set is the same in any
    order and adding a shift or severity leaves the others' images alone.
    """
    check_shifts([shift], [severity])
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"lab shifts expect square uint8 RGB images (N, S, S, 3), got {images.dtype} {images.shape}")
    function, position = _SHIFT_FUNCTIONS[shift], SHIFTS.index(shift)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        rng = np.random.default_rng([seed, position, severity, i])
        out[i] = np.clip(np.rint(function(image.astype(np.float32), severity, rng)), 0, 255).astype(np.uint8)
    return out


def build_shift_set(
    images: np.ndarray,
    labels: np.ndarray,
    clean_index: np.ndarray,
    settings: ShiftSettings = ShiftSettings(),
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Every image under every shift and severity: (images, manifest with :data:`MANIFEST_COLUMNS`)."""
    blocks, frames = [], []
    for shift in settings.shifts:
        for severity in settings.severities:
            blocks.append(shift_images(images, shift, severity, seed=settings.seed))
            frames.append(pd.DataFrame({
                "shift": shift, "severity": severity, "clean_index": np.asarray(clean_index, np.int64),
                "label": np.asarray(labels, np.int64),
            }))  # fmt: skip
            if progress:
                progress(shift, severity, len(images))
    if not blocks:
        return np.zeros((0, *np.shape(images)[1:]), np.uint8), pd.DataFrame(columns=MANIFEST_COLUMNS)
    return np.concatenate(blocks), pd.concat(frames, ignore_index=True)


def with_shifted_copies(images: np.ndarray, labels: np.ndarray, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``images`` followed by one copy of them under each shift, every fifth image at each severity; and their labels.

    A validation set for model selection towards another lab (``TrainingSettings.selection``): an
    epoch is kept for how well it holds the shifts as well as the clean cells. Severities cycle
    over the images rather than multiplying them, so the set is six times the split, not 26.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    blocks, block_labels = [images], [labels]
    for shift in SHIFTS:
        for k, severity in enumerate(SEVERITIES):
            rows = slice(k, None, len(SEVERITIES))
            blocks.append(shift_images(images[rows], shift, severity, seed=seed))
            block_labels.append(labels[rows])
    return np.concatenate(blocks), np.concatenate(block_labels)


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes present in ``truth`` (a set missing classes is not penalised for them)."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    return float(np.mean([np.mean(predicted[truth == c] == c) for c in np.unique(truth)])) if len(truth) else float("nan")


def shift_scores(truth: np.ndarray, predicted: np.ndarray, manifest: pd.DataFrame) -> pd.DataFrame:
    """Accuracy and balanced accuracy per (shift, severity), in the manifest's order of shifts."""
    frame = manifest.assign(truth=np.asarray(truth), predicted=np.asarray(predicted))
    rows = [
        {"shift": shift, "severity": int(severity), "images": len(group),
         "accuracy": float(np.mean(group["truth"] == group["predicted"])),
         "balanced_accuracy": balanced_accuracy(group["truth"].to_numpy(), group["predicted"].to_numpy())}
        for (shift, severity), group in frame.groupby(["shift", "severity"], sort=False)
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["shift", "severity", "images", "accuracy", "balanced_accuracy"])


def seen_shifts(presets: Iterable[str], *, selected_on_shifts: bool = False) -> list[str]:
    """The shifts that the given training presets resemble (``lab`` only when all four are); all of
    them when the model's epochs were chosen on shifted validation images (:func:`with_shifted_copies`)."""
    if selected_on_shifts:
        return list(SHIFTS)
    seen = {name for preset in presets for name in PRESET_RESEMBLANCE.get(preset, ())}
    if all(name in seen for name in SHIFTS[:-1]):
        seen.add("lab")
    return [name for name in SHIFTS if name in seen]


def shift_summary(table: pd.DataFrame, seen: Sequence[str] = ()) -> dict[str, float | None]:
    """The headline numbers: mean accuracy over all cells, over the shifts training did not resemble, and on ``lab``."""

    def mean(rows: pd.DataFrame) -> float | None:
        return float(rows["accuracy"].mean()) if len(rows) else None

    return {
        "shift_accuracy": mean(table),
        "shift_accuracy_unseen": mean(table[~table["shift"].isin(list(seen))]),
        "lab_shift_accuracy": mean(table[table["shift"] == "lab"]),
    }


def _magnify(plane: Image.Image, factor: float) -> Image.Image:
    """One colour plane magnified about its centre (below 1: shrunk, its border repeated outwards)."""
    size = plane.size[0]
    margin = int(np.ceil(size * max(0.0, 1 / factor - 1) / 2)) + 1
    padded = Image.fromarray(np.pad(np.asarray(plane), margin, mode="edge"))
    window, centre = size / factor, size / 2 + margin
    box = (centre - window / 2, centre - window / 2, centre + window / 2, centre + window / 2)
    return padded.resize((size, size), Image.Resampling.BILINEAR, box=box)


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))
