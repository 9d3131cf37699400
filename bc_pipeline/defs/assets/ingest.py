"""Stage 1: observe the configured image source, and load it into one validated array and manifest."""

import dagster as dg

from bc_pipeline.core.artifacts import ImageSet
from bc_pipeline.core.plots import class_sample_grid
from bc_pipeline.dagster_utils import metadata as md
from bc_pipeline.dagster_utils.versions import versioned
from bc_pipeline.defs.resources import ImageSource, PipelineStorage
from bc_pipeline.ingest.bloodmnist import FetchError
from bc_pipeline.ingest.loaders import ImageSourceError
from bc_pipeline.ingest.source_version import SourceSnapshot, snapshot


def observation_metadata(seen: SourceSnapshot) -> dict[str, dg.MetadataValue]:
    """What an observation of the source records next to its data version."""
    return {
        "path": dg.MetadataValue.path(str(seen.path)),
        "files": dg.MetadataValue.int(seen.files),
        "megabytes": dg.MetadataValue.float(round(seen.bytes / 1e6, 2)),
    }


@dg.observable_source_asset(
    group_name="ingest",
    description=(
        "The configured image source on disk (file or class folders). raw_data_sensor records an "
        "observation within 30 s of a change, and 'Observe sources' does on demand. Its data version "
        "is a digest of the content: adding, removing or editing an image changes it, touching a "
        "file does not."
    ),
)
def raw_image_source(
    context: dg.OpExecutionContext, image_source: ImageSource, storage: PipelineStorage
) -> dg.ObserveResult:
    try:
        path = image_source.resolve_path(storage.root)
    except ValueError as error:
        raise dg.Failure(description=f"bad image source: {error}", allow_retries=False) from None
    seen = snapshot(path)
    context.log.info(f"{path}: {seen.files} files, {seen.bytes / 1e6:.1f} MB, version {seen.version}")
    return dg.ObserveResult(data_version=dg.DataVersion(seen.version), metadata=observation_metadata(seen))


@dg.asset(
    code_version="3",
    group_name="ingest",
    deps=[raw_image_source],
    kinds={"numpy", "parquet"},
    description="All source images as RGB uint8 at one size, with a manifest (id, source, label, size) and the class names.",
)
def raw_images(
    context: dg.AssetExecutionContext, image_source: ImageSource, storage: PipelineStorage
) -> dg.Output[ImageSet]:
    try:  # streamed to a staging images.npy, moved into place when stored (a million images never in memory)
        loaded = image_source.load(storage.root, log=context.log.info, out_dir=storage.staging_dir("raw_images"))
    except ImageSourceError as error:
        raise dg.Failure(description=f"bad image source: {error}", allow_retries=False) from None
    except FetchError as error:
        raise dg.Failure(description=f"default dataset unavailable: {error}", allow_retries=False) from None
    manifest, class_names = loaded.manifest, tuple(image_source.class_names)
    counts = manifest.groupby("class_name").size().reindex(class_names, fill_value=0)
    context.log.info(f"loaded {len(manifest)} images, skipped {len(loaded.skipped)}")
    for row in loaded.skipped.head(20).itertuples():
        context.log.warning(f"skipped {row.source}: {row.reason}")

    grid = class_sample_grid(loaded.images, manifest["label"].to_numpy(), list(class_names))
    metadata = {
        "num_images": len(manifest),
        "num_skipped": len(loaded.skipped),
        "image_size": image_source.image_size,
        "source": f"{image_source.kind}: {image_source.resolve_path(storage.root)}",
        "class_counts": md.table(counts.rename_axis("class").reset_index(name="images")),
        **md.image(grid, storage.report_dir("raw_images") / "samples.png", "sample_grid"),
    }
    if len(loaded.skipped):
        metadata["skipped"] = md.table(loaded.skipped)
    value = ImageSet(loaded.images, manifest, {"skipped": loaded.skipped}, class_names, images_file=loaded.images_file)
    return versioned(value, loaded.images, manifest, list(class_names), metadata=metadata)

