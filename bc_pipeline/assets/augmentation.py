"""Stage 4b: augmented copies of the balanced training set, and perturbed copies of val/test."""

import os
import shutil
import time
from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from bc_pipeline import automation
from bc_pipeline.assets._versions import with_config
from bc_pipeline.assets import _metadata as md
from bc_pipeline.assets._reuse import CONFIG_FINGERPRINT, config_fingerprint, unchanged_stored_output
from bc_pipeline.assets.training import split_arrays
from bc_pipeline.lib.artifacts import ImageSet, ShardSet, read_artifact
from bc_pipeline.lib.augmentation import IMAGE_PRESETS, PRESETS, check_image_preset, make_augmenter
from bc_pipeline.lib.plots import image_rows
from bc_pipeline.lib.storage import fingerprint, save_npy
from bc_pipeline.resources import PipelineStorage

ImagePreset = Literal["light", "randaugment", "augmix", "gridmask", "strong", "categorical", "illumination", "focus", "noise", "pixmix"]


class AugmentConfig(dg.Config):
    """Which preset makes the stored training copies, and how many copies."""

    policy: ImagePreset = Field(default="light", description="Augmentation preset (see lib/augmentation.py).")
    mix: list[str] = Field(
        default=[], description="Presets taken in turn, copy k by mix[k % len(mix)], for more variety per epoch "
        "(empty: every copy by policy).",
    )  # fmt: skip
    copies: int = Field(default=1, ge=0, le=64, description="Augmented copies K of the balanced set; 0 stores none.")
    shard_size: int = Field(default=4096, ge=64, description="Images per .npy shard.")
    seed: int = 0

    @field_validator("mix")
    @classmethod
    def _image_presets(cls, names: list[str]) -> list[str]:
        for name in names:
            check_image_preset(name)
        return names

    def policy_of(self, copy: int) -> str:
        return self.mix[copy % len(self.mix)] if self.mix else self.policy


class RobustnessConfig(dg.Config):
    """Which presets perturb the validation and test splits for robust accuracy."""

    policies: list[str] = Field(
        default=list(IMAGE_PRESETS), description="Image presets (the training families) applied to the val and test splits; the "
        "headline robust number is the corruption suite's, which no preset makes.",
    )
    seed: int = 1

    @field_validator("policies")
    @classmethod
    def _known_image_presets(cls, policies: list[str]) -> list[str]:
        for name in policies:
            check_image_preset(name)
        if len(set(policies)) != len(policies):
            raise ValueError(f"policies repeat a name: {policies}")
        return policies


@dg.asset(
    code_version=with_config("2", AugmentConfig),
    automation_condition=automation.on_change(),
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
    stored = unchanged_stored_output(context, config)
    if stored is not None:
        context.log.info(f"balanced set, config and code unchanged: reusing the stored sample {stored}")
        value = _relinked(read_artifact(stored, what="augmented_train_set"), staging)
        versions = [fingerprint(value.load(i)[0]) for i in range(len(value.manifest))]
        metadata = {
            "reused_stored_sample": True, "policy": config.policy, "copies": config.copies, "images": len(value),
            "shards": len(value.manifest), CONFIG_FINGERPRINT: config_fingerprint(config),
        }  # fmt: skip
        version = fingerprint(list(dict.fromkeys(value.manifest["policy"])) or [config.policy], labels, *versions)
        return dg.Output(value, data_version=dg.DataVersion(version), metadata=metadata)
    rows, versions, seconds = [], [], 0.0
    spans = [(start, min(start + config.shard_size, len(images))) for start in range(0, len(images), config.shard_size)]
    for copy in range(config.copies):
        augment = make_augmenter(config.policy_of(copy), seed=config.seed * 1_009 + copy)
        for part, (start, stop) in enumerate(spans):
            began = time.perf_counter()
            shard = augment(np.asarray(images[start:stop]))
            seconds += time.perf_counter() - began
            name = f"copy{copy:02d}_part{part:03d}"
            save_npy(staging / f"{name}.images.npy", shard)
            save_npy(staging / f"{name}.labels.npy", labels[start:stop])
            versions.append(fingerprint(shard))
            rows.append((f"{name}.images.npy", f"{name}.labels.npy", copy, part, config.policy_of(copy), start, stop - start))
            context.log.info(
                f"copy {copy + 1}/{config.copies} shard {part + 1}/{len(spans)}: {stop - start} images "
                f"({(stop - start) / (time.perf_counter() - began):.0f} images/s)"
            )
    manifest = pd.DataFrame(rows, columns=["file", "labels_file", "copy", "part", "policy", "start", "count"])
    value = ShardSet(directory=staging, manifest=manifest)
    total = len(value)
    used = list(dict.fromkeys(config.policy_of(copy) for copy in range(config.copies))) or [config.policy]
    metadata = {
        "policy": ", ".join(used),
        "policy_description": "; ".join(PRESETS[p].description for p in used),
        "copies": config.copies,
        "images": total,
        "shards": len(manifest),
        "images_per_second": round(total / seconds, 1) if seconds else 0.0,
        "augment_seconds": round(seconds, 1),
        "reused_stored_sample": False,
        CONFIG_FINGERPRINT: config_fingerprint(config),
    }
    if total:
        grid = _copies_grid(images, value, ", ".join(used), seed=config.seed)
        metadata.update(md.image(grid, storage.report_dir("augmented_train_set") / "samples.png", "samples"))
    version = fingerprint(used, labels, *versions)
    return dg.Output(value, data_version=dg.DataVersion(version), metadata=metadata)


@dg.asset_check(
    asset=augmented_train_set,
    additional_ins={"balanced_train_set": dg.AssetIn("balanced_train_set")},
    blocking=True,
    description="Every shard has the labels, shape and dtype of its source rows.",
)
def shards_match_balanced_set(augmented_train_set: ShardSet, balanced_train_set: ImageSet) -> dg.AssetCheckResult:
    labels = balanced_train_set.manifest["label"].to_numpy(np.int64)
    shape = balanced_train_set.images.shape[1:]
    problems = []
    for i, row in augmented_train_set.manifest.iterrows():
        images, shard_labels = augmented_train_set.load(i)
        expected = labels[row["start"] : row["start"] + row["count"]]
        if images.dtype != np.uint8 or images.shape[1:] != shape or len(images) != row["count"]:
            problems.append(f"{row['file']}: {images.dtype} {images.shape}, expected uint8 ({row['count']}, *{shape})")
        elif not np.array_equal(shard_labels, expected):
            problems.append(f"{row['labels_file']}: labels differ from balanced_train_set rows {row['start']}+")
    return dg.AssetCheckResult(
        passed=not problems, metadata={"shards": len(augmented_train_set.manifest), "problems": problems[:20]}
    )


@dg.asset(
    code_version=with_config("1", RobustnessConfig),
    automation_condition=automation.on_change(),
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
    stored = unchanged_stored_output(context, config)
    if stored is not None:
        context.log.info(f"splits, config and code unchanged: reusing the stored perturbed sets {stored}")
        value = read_artifact(stored, what="robustness_eval_sets")
        metadata = {"reused_stored_sample": True, "images": len(value.images), CONFIG_FINGERPRINT: config_fingerprint(config)}
        return dg.Output(value, data_version=dg.DataVersion(fingerprint(value.images, value.manifest)), metadata=metadata)
    splits = {split: split_arrays(clean_images, data_splits, split) for split in ("val", "test")}
    parts, frames = [], []
    for number, policy in enumerate(config.policies):
        augment = make_augmenter(policy, seed=config.seed * 1_009 + number)  # traced once for both splits
        for split, (images, labels) in splits.items():
            began = time.perf_counter()
            parts.append(augment(images))
            rate = len(images) / (time.perf_counter() - began)
            context.log.info(f"{split} x {policy}: {len(images)} images ({rate:.0f} images/s)")
            rows = data_splits.loc[data_splits["split"] == split, "index"].to_numpy()
            frames.append(pd.DataFrame({"policy": policy, "split": split, "clean_index": rows, "label": labels}))
    manifest = pd.concat(frames, ignore_index=True)
    images = np.concatenate(parts) if parts else np.zeros((0, *clean_images.images.shape[1:]), np.uint8)
    metadata = {
        "policies": dg.MetadataValue.json({p: PRESETS[p].description for p in config.policies}),
        "images": len(images),
        "images_per_split": dg.MetadataValue.json(manifest.groupby("split").size().div(len(config.policies)).astype(int).to_dict()),
        "reused_stored_sample": False,
        CONFIG_FINGERPRINT: config_fingerprint(config),
    }
    if len(images):
        grid = _policies_grid(clean_images, manifest, images, config.policies)
        metadata.update(md.image(grid, storage.report_dir("robustness_eval_sets") / "samples.png", "samples"))
    version = fingerprint(images, manifest)
    return dg.Output(ImageSet(images=images, manifest=manifest), data_version=dg.DataVersion(version), metadata=metadata)


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
