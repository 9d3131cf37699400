"""Stage 2: perceptual hashes and duplicate groups."""

import time

import dagster as dg
import numpy as np
import pandas as pd

from bc_pipeline.core.artifacts import ImageSet
from bc_pipeline.core.chunks import every_tenth
from bc_pipeline.core.plots import group_examples
from bc_pipeline.core.storage import save_parquet
from bc_pipeline.dagster_utils import metadata as md
from bc_pipeline.dagster_utils.versions import SettingsConfig, setting, versioned, with_config
from bc_pipeline.defs.resources import PipelineStorage
from bc_pipeline.quality.dedup import DedupSettings, NearPairs, duplicate_counts, find_duplicates_cached, summarize_groups
from bc_pipeline.quality.hashing import HASH_ALGORITHM_VERSION, hash_hex, hash_with_cache


@dg.asset(
    code_version="1",
    group_name="dedup",
    kinds={"parquet"},
    description="phash and dhash (64-bit, imagehash-compatible) of every raw image, cached by image id.",
)
def image_hashes(
    context: dg.AssetExecutionContext, raw_images: ImageSet, storage: PipelineStorage
) -> dg.Output[pd.DataFrame]:
    cache_path = storage.cache_dir() / f"image_hashes-{HASH_ALGORITHM_VERSION}.parquet"
    cache = _read_cache(cache_path, context)

    progress = every_tenth(lambda done, total: context.log.info(f"hashed {done}/{total} new images"))
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
    return versioned(hashes, metadata=metadata)


def _read_cache(path, context: dg.AssetExecutionContext, parse=lambda frame: frame):
    """The parsed cache table at ``path``, or None when absent or unreadable."""
    if not path.exists():
        return None
    try:
        return parse(pd.read_parquet(path))
    except Exception as error:  # a damaged cache only costs recomputing what it held
        context.log.warning(f"ignoring unreadable cache {path} (it will be rebuilt): {error}")
        return None


class DuplicateConfig(SettingsConfig):
    """The near-duplicate threshold (quality.dedup.DedupSettings)."""

    settings_class = DedupSettings
    threshold: int = setting(DedupSettings, "threshold")


@dg.asset(
    code_version=with_config("1", DuplicateConfig),
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
    cache_path = storage.cache_dir() / f"near_pairs-{HASH_ALGORITHM_VERSION}.parquet"
    known = _read_cache(cache_path, context, parse=NearPairs.from_frame)
    start = time.perf_counter()
    table, pairs, compared = find_duplicates_cached(
        raw_images.manifest["image_id"],
        raw_images.manifest["label"],
        image_hashes["phash"].to_numpy(np.uint64),
        image_hashes["dhash"].to_numpy(np.uint64),
        threshold=config.threshold,
        known=known,
    )
    seconds = time.perf_counter() - start
    save_parquet(cache_path, pairs.to_frame())
    counts = duplicate_counts(table)
    context.log.info(f"duplicate search ({seconds:.1f}s, {compared} images compared, the rest cached): {counts}")
    metadata: dict = {**counts, "threshold": config.threshold, "compared_now": compared, "search_seconds": round(seconds, 2)}
    for kind in ("exact", "near"):
        groups = summarize_groups(table, kind)
        metadata[f"largest_{kind}_groups"] = md.table(groups.head(20))
    names = dict(zip(raw_images.manifest["label"], raw_images.manifest["class_name"]))
    examples = _example_groups(table, names)
    if examples:
        captions = [caption for _, caption in examples]
        png = group_examples(raw_images.images, [members for members, _ in examples], captions)
        metadata.update(md.image(png, storage.report_dir("duplicate_groups") / "examples.png", "example_groups"))
    return versioned(table, metadata=metadata)


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
