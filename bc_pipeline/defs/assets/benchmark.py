"""Stage 5a: the honest robustness benchmark set, the test split under the ImageNet-C corruptions.

Made once and stored like the other evaluation sets, so every model is scored on the same images;
no training path reads it (see evaluation/imagenet_c.py).
"""

import os

import dagster as dg
import numpy as np
import pandas as pd

from bc_pipeline.core.artifacts import ImageSet
from bc_pipeline.core.plots import image_rows
from bc_pipeline.dagster_utils import metadata as md
from bc_pipeline.dagster_utils.versions import SettingsConfig, setting, versioned, with_config
from bc_pipeline.defs.resources import PipelineStorage
from bc_pipeline.evaluation.imagenet_c import SuiteSettings, build_corrupted_set, subsample
from bc_pipeline.preparation.splits import split_arrays, split_rows


class CorruptionSuiteConfig(SettingsConfig):
    """Which corruptions and severities, on how many test images (evaluation.imagenet_c.SuiteSettings)."""

    settings_class = SuiteSettings
    corruptions: list[str] = setting(SuiteSettings, "corruptions")
    severities: list[int] = setting(SuiteSettings, "severities")
    max_images: int = setting(SuiteSettings, "max_images")
    workers: int = setting(SuiteSettings, "workers")
    seed: int = setting(SuiteSettings, "seed")


@dg.asset(
    code_version=with_config("1", CorruptionSuiteConfig),
    group_name="evaluation",
    kinds={"numpy"},
    description="The test split under the 15 ImageNet-C corruptions x 5 severities: the headline robustness benchmark.",
)
def corruption_benchmark_set(
    context: dg.AssetExecutionContext,
    config: CorruptionSuiteConfig,
    clean_images: ImageSet,
    data_splits: pd.DataFrame,
    storage: PipelineStorage,
) -> dg.Output[ImageSet]:
    images, labels = split_arrays(clean_images, data_splits, "test")
    chosen = subsample(labels, config.max_images, seed=config.seed)
    workers = config.workers or os.cpu_count() or 1
    context.log.info(f"{len(chosen)} of {len(labels)} test images x {len(config.corruptions)} corruptions x "
                     f"{len(config.severities)} severities, {workers} process(es)")  # fmt: skip

    def progress(corruption: str, severity: int, count: int, seconds: float) -> None:
        context.log.info(f"{corruption} severity {severity}: {count} images ({count / max(seconds, 1e-9):.0f} images/s)")

    built = build_corrupted_set(
        images[chosen], labels[chosen], split_rows(data_splits, "test")[chosen], corruptions=config.corruptions,
        severities=config.severities, seed=config.seed, workers=workers, progress=progress,
    )  # fmt: skip
    value = ImageSet(images=built.images, manifest=built.manifest)
    metadata = {
        "images": len(value.images),
        "test_images": len(chosen),
        "corruptions": ", ".join(config.corruptions),
        "severities": ", ".join(map(str, config.severities)),
    }
    if len(chosen):
        metadata.update(md.image(_grid(images[chosen], built, config.severities), storage.report_dir("corruption_benchmark_set") / "samples.png", "samples"))
    return versioned(value, value.images, value.manifest, metadata=metadata)


def _grid(clean: np.ndarray, built, severities: list[int]) -> bytes:
    """One test image, clean and under every corruption at each severity (one row per corruption)."""
    manifest = built.manifest
    first = manifest.index[manifest["clean_index"] == manifest["clean_index"].iloc[0]]
    rows = [("clean", np.repeat(clean[:1], len(severities), axis=0))]
    for corruption, members in manifest.loc[first].groupby("corruption", sort=False).groups.items():
        rows.append((corruption, built.images[np.asarray(members)]))
    return image_rows(rows, columns=len(severities), title="One test image under each corruption, severities " + ", ".join(map(str, severities)))
