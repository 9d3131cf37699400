"""The eight blood-cell classes, in the label order of the course reports and of BloodMNIST."""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)
