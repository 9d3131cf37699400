"""Stage 2: perceptual hashes and duplicate groups."""

import time

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from bc_pipeline import automation
from bc_pipeline.assets._versions import with_config
from bc_pipeline.assets import _metadata as md
from bc_pipeline.lib.artifacts import ImageSet
from bc_pipeline.lib.dedup import duplicate_counts, find_duplicates, summarize_groups
from bc_pipeline.lib.hashing import HASH_ALGORITHM_VERSION, hash_hex, hash_with_cache
from bc_pipeline.lib.plots import group_examples
from bc_pipeline.lib.storage import fingerprint, save_parquet
from bc_pipeline.resources import PipelineStorage


@dg.asset(
    code_version="1",
    automation_condition=automation.on_change(),
    group_name="dedup",
    kinds={"parquet"},
    description="phash and dhash (64-bit, imagehash-compatible) of every raw image, cached by image id.",
)
def image_hashes(
    context: dg.AssetExecutionContext, raw_images: ImageSet, storage: PipelineStorage
) -> dg.Output[pd.DataFrame]:
    cache_path = storage.cache_dir() / f"image_hashes-{HASH_ALGORITHM_VERSION}.parquet"
    cache = _read_cache(cache_path, context)

    next_report = [0.0]

    def progress(done: int, total: int) -> None:
        if done / total >= next_report[0] or done == total:
            context.log.info(f"hashed {done}/{total} new images")
            next_report[0] = done / total + 0.1

    start = time.perf_counter()
    hashes, updated_cache, computed = hash_with_cache(
        raw_images.images, raw_images.manifest["image_id"], cache, progress=progress
    )
    seconds = time.perf_counter() - start
    save_parquet(cache_path, updated_cache)
    context.log.info(f"{computed} images hashed, {len(hashes) - computed} from cache, {seconds:.1f}s")
    preview = hashes.head(10).assign(
        phash=lambda f: f["phash"].map(hash_hex), dhash=lambda f: f["dhash"].map(hash_hex)
    )
    metadata = {
        "num_images": len(hashes),
        "hashed_now": computed,
        "from_cache": len(hashes) - computed,
        "seconds": round(seconds, 2),
        "images_per_second": round(computed / seconds, 1) if computed and seconds > 0 else 0.0,
        "preview": md.table(preview),
    }
    return dg.Output(hashes, data_version=dg.DataVersion(fingerprint(hashes)), metadata=metadata)


def _read_cache(path, context: dg.AssetExecutionContext) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as error:  # a damaged cache only costs a rehash
        context.log.warning(f"ignoring unreadable hash cache {path}: {error}")
        return None


class DuplicateConfig(dg.Config):
    threshold: int = Field(
        default=4,
        ge=0,
        le=64,
        description="Two images are near duplicates when phash and dhash each differ in at most this many bits.",
    )


@dg.asset(
    code_version=with_config("1", DuplicateConfig),
    automation_condition=automation.on_change(),
    group_name="dedup",
    kinds={"parquet"},
    description="Exact (identical pixels) and near (Hamming distance) duplicate groups and label conflicts.",
)
def duplicate_groups(
    context: dg.AssetExecutionContext,
    config: DuplicateConfig,
    raw_images: ImageSet,
    image_hashes: pd.DataFrame,
    storage: PipelineStorage,
) -> dg.Output[pd.DataFrame]:
    start = time.perf_counter()
    table = find_duplicates(
        raw_images.manifest["image_id"],
        raw_images.manifest["label"],
        image_hashes["phash"].to_numpy(np.uint64),
        image_hashes["dhash"].to_numpy(np.uint64),
        threshold=config.threshold,
    )
    counts = duplicate_counts(table)
    context.log.info(f"duplicate search ({time.perf_counter() - start:.1f}s): {counts}")
    metadata: dict = {**counts, "threshold": config.threshold}
    for kind in ("exact", "near"):
        groups = summarize_groups(table, kind)
        metadata[f"largest_{kind}_groups"] = md.table(groups.head(20))
    names = dict(zip(raw_images.manifest["label"], raw_images.manifest["class_name"]))
    examples = _example_groups(table, names)
    if examples:
        captions = [caption for _, caption in examples]
        png = group_examples(raw_images.images, [members for members, _ in examples], captions)
        metadata.update(md.image(png, storage.report_dir("duplicate_groups") / "examples.png", "example_groups"))
    return dg.Output(table, data_version=dg.DataVersion(fingerprint(table)), metadata=metadata)


def _example_groups(table: pd.DataFrame, names: dict, limit: int = 8) -> list[tuple[list[int], str]]:
    """Conflicting groups first, then the largest near and exact groups."""
    near = summarize_groups(table, "near")
    if near.empty:
        return []
    near = near.sort_values(["conflict", "size"], ascending=[False, False]).head(limit)
    return [
        (
            row.members,
            f"group {row.group}: {' / '.join(str(names.get(label, label)) for label in row.labels)}"
            + (" (CONFLICT)" if row.conflict else ""),
        )
        for row in near.itertuples()
    ]
