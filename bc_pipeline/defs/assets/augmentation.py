"""Stage 4b: augmented copies of the balanced training set, and perturbed copies of val/test."""

import os
import shutil

import dagster as dg
import numpy as np
import pandas as pd

from bc_pipeline.augmentation.presets import (
    PRESETS,
    AugmentSettings,
    ImagePreset,
    PerturbSettings,
    perturb_splits,
    write_augmented_copies,
)
from bc_pipeline.core.artifacts import ImageSet, ShardSet, read_artifact
from bc_pipeline.core.plots import image_rows
from bc_pipeline.core.storage import fingerprint
from bc_pipeline.dagster_utils import metadata as md
from bc_pipeline.dagster_utils.reuse import REUSE_KEY, reuse_key, unchanged_stored_output
from bc_pipeline.dagster_utils.versions import SettingsConfig, setting, versioned, with_config
from bc_pipeline.defs.resources import PipelineStorage
from bc_pipeline.preparation.splits import split_arrays, split_rows


class AugmentConfig(SettingsConfig):
    """Which preset makes the stored training copies, and how many (augmentation.presets.AugmentSettings)."""

    settings_class = AugmentSettings
    policy: ImagePreset = setting(AugmentSettings, "policy")
    mix: list[str] = setting(AugmentSettings, "mix")
    copies: int = setting(AugmentSettings, "copies")
    shard_size: int = setting(AugmentSettings, "shard_size")
    seed: int = setting(AugmentSettings, "seed")


class RobustnessConfig(SettingsConfig):
    """Which presets perturb the validation and test splits (augmentation.presets.PerturbSettings)."""

    settings_class = PerturbSettings
    policies: list[str] = setting(PerturbSettings, "policies")
    seed: int = setting(PerturbSettings, "seed")


@dg.asset(
    code_version=with_config("2", AugmentConfig),
    group_name="augmentation",
    kinds={"numpy", "tensorflow"},
    description="K augmented copies of the balanced training set as .npy shards, so training never waits on them.",
)
def augmented_train_set(
    context: dg.AssetExecutionContext,
    config: AugmentConfig,
    balanced_train_set: ImageSet,
    storage: PipelineStorage,
) -> dg.Output[ShardSet]:
    staging = storage.staging_dir("augmented_train_set")
    images, labels = balanced_train_set.images, balanced_train_set.manifest["label"].to_numpy(np.int64)
    key = reuse_key(config, images, balanced_train_set.manifest)
    policies = config.settings().policies()
    stored = unchanged_stored_output(context, key)
    if stored is not None:
        context.log.info(f"balanced set, config and code unchanged: reusing the stored sample {stored}")
        value = _relinked(read_artifact(stored, what="augmented_train_set"), staging)
        digests = [fingerprint(value.load(i)[0]) for i in range(len(value.manifest))]
        used = list(dict.fromkeys(value.manifest["policy"])) or [config.policy]
        metadata = {"reused_stored_sample": True, "policy": config.policy, "copies": config.copies, "images": len(value),
                    "shards": len(value.manifest), REUSE_KEY: key}  # fmt: skip
        return versioned(value, used, labels, *digests, metadata=metadata)
    manifest, digests, seconds = write_augmented_copies(
        images, labels, staging, policies=policies, shard_size=config.shard_size, seed=config.seed, log=context.log.info
    )
    value, used = ShardSet(directory=staging, manifest=manifest), list(dict.fromkeys(policies)) or [config.policy]
    metadata = {
        "policy": ", ".join(used),
        "policy_description": "; ".join(PRESETS[p].description for p in used),
        "copies": config.copies,
        "images": len(value),
        "shards": len(manifest),
        "images_per_second": round(len(value) / seconds, 1) if seconds else 0.0,
        "augment_seconds": round(seconds, 1),
        "reused_stored_sample": False,
        REUSE_KEY: key,
    }
    if len(value):
        grid = _copies_grid(images, value, ", ".join(used), seed=config.seed)
        metadata.update(md.image(grid, storage.report_dir("augmented_train_set") / "samples.png", "samples"))
    return versioned(value, used, labels, *digests, metadata=metadata)


@dg.asset(
    code_version=with_config("1", RobustnessConfig),
    group_name="augmentation",
    kinds={"numpy", "tensorflow"},
    description="The val and test splits perturbed once by each preset ('strong' emulates the hidden test set).",
)
def robustness_eval_sets(
    context: dg.AssetExecutionContext,
    config: RobustnessConfig,
    clean_images: ImageSet,
    data_splits: pd.DataFrame,
    storage: PipelineStorage,
) -> dg.Output[ImageSet]:
    key = reuse_key(config, clean_images.images, clean_images.manifest, data_splits)
    stored = unchanged_stored_output(context, key)
    if stored is not None:
        context.log.info(f"splits, config and code unchanged: reusing the stored perturbed sets {stored}")
        value = read_artifact(stored, what="robustness_eval_sets")
        return versioned(value, value.images, value.manifest, metadata={"reused_stored_sample": True, "images": len(value.images), REUSE_KEY: key})
    splits = {split: (*split_arrays(clean_images, data_splits, split), split_rows(data_splits, split)) for split in ("val", "test")}
    images, manifest = perturb_splits(splits, config.policies, seed=config.seed, log=context.log.info)
    metadata = {
        "policies": dg.MetadataValue.json({p: PRESETS[p].description for p in config.policies}),
        "images": len(images),
        "images_per_split": dg.MetadataValue.json(manifest.groupby("split").size().div(max(1, len(config.policies))).astype(int).to_dict()),
        "reused_stored_sample": False,
        REUSE_KEY: key,
    }
    if len(images):
        grid = _policies_grid(clean_images, manifest, images, config.policies)
        metadata.update(md.image(grid, storage.report_dir("robustness_eval_sets") / "samples.png", "samples"))
    return versioned(ImageSet(images=images, manifest=manifest), images, manifest, metadata=metadata)


def _relinked(shards: ShardSet, staging) -> ShardSet:
    """The stored shards hard-linked into ``staging`` (no copy), for the IO manager to move into place."""
    for file in [*shards.manifest["file"], *shards.manifest["labels_file"]]:
        try:
            os.link(shards.directory / file, staging / file)
        except OSError:  # another file system, or no hard links: copy
            shutil.copy2(shards.directory / file, staging / file)
    return ShardSet(directory=staging, manifest=shards.manifest.copy())


def _copies_grid(images: np.ndarray, shards: ShardSet, policy: str, *, seed: int) -> bytes:
    """The same eight training images: the original, then each stored copy (first shard only)."""
    first = shards.manifest[shards.manifest["part"] == 0]
    count = min(8, int(first["count"].min()))
    chosen = np.sort(np.random.default_rng(seed).choice(int(first["count"].min()), size=count, replace=False))
    rows = [("original", np.asarray(images[chosen]))]
    for i, row in first.head(4).iterrows():
        rows.append((f"{row['policy']} copy {row['copy'] + 1}", np.asarray(shards.load(i)[0][chosen])))
    return image_rows(rows, title=f"Stored training copies ({policy})")


def _policies_grid(clean: ImageSet, manifest: pd.DataFrame, images: np.ndarray, policies: list[str]) -> bytes:
    """The same eight test (or, if the test split is empty, validation) images, clean and under each preset."""
    split = "test" if (manifest["split"] == "test").any() else "val"
    rows = []
    for policy in policies:
        members = manifest.index[(manifest["split"] == split) & (manifest["policy"] == policy)][:8]
        if not rows:
            rows.append(("clean", np.asarray(clean.images[manifest.loc[members, "clean_index"].to_numpy()])))
        rows.append((policy, images[members]))
    return image_rows(rows, title=f"{split.capitalize()} images under each robustness preset")
