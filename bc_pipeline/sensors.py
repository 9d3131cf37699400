"""Sensors: the automation sensor that runs the declarative conditions, and the drop-folder sensor.

Both are on by default, so ``make dev`` keeps the pipeline up to date without clicking anything.
"""

from __future__ import annotations

import json

import dagster as dg

from bc_pipeline.jobs import observe_raw_source_job
from bc_pipeline.lib.source_version import changed_entries, folder_stamps, is_within, snapshot
from bc_pipeline.resources import ImageSource, PipelineStorage

automation_sensor = dg.AutomationConditionSensorDefinition(
    "bc_automation",
    target=dg.AssetSelection.all(include_sources=True),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description=(
        "Evaluates every asset's automation condition (bc_pipeline/automation.py) every 30 s: reruns "
        "what changed data or code versions make out of date, observes the raw source every 5 minutes."
    ),
)


@dg.sensor(
    job=observe_raw_source_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Watches data/raw/: when a file of the configured source appears or changes there, observes the "
        "source, and the automation sensor reruns the pipeline from raw_images. Other files are reported."
    ),
)
def raw_dataset_sensor(context: dg.SensorEvaluationContext, image_source: ImageSource, storage: PipelineStorage):
    raw_dir = storage.root / "raw"
    previous = json.loads(context.cursor) if context.cursor else {}
    stamps = folder_stamps(raw_dir)
    changed = changed_entries(previous.get("stamps", {}), stamps)
    if not changed:
        return dg.SkipReason(f"nothing new in {raw_dir}")
    try:
        source = image_source.resolve_path(storage.root)
    except ValueError as error:
        return dg.SkipReason(f"{len(changed)} changed file(s) in {raw_dir}, but the image source is unusable: {error}")

    ours = [name for name in changed if is_within(raw_dir / name, source)]
    others = [name for name in changed if name not in ours and name in stamps]
    version = snapshot(source).version if ours else previous.get("version")
    context.update_cursor(json.dumps({"stamps": stamps, "version": version}))
    if ours and version != previous.get("version"):
        context.log.info(f"{len(ours)} changed file(s) of the source {source}: observing it (version {version})")
        return dg.RunRequest(run_key=f"raw-source-{version}", tags={"bc/trigger": "data/raw"})
    if others:
        return dg.SkipReason(
            f"new or changed in {raw_dir}: {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}; "
            f"the pipeline reads {image_source.kind} {source}. To use a new file, point it there "
            "(BC_SOURCE=npz|folder BC_SOURCE_PATH=<path>) and restart `make dev`."
        )
    return dg.SkipReason(f"{len(changed)} file(s) in {raw_dir} re-stamped, content unchanged (version {version})")


all_sensors = [automation_sensor, raw_dataset_sensor]
