"""Sensors: the automation sensor that runs the declarative conditions, the raw-data and label-review sensors.

Both are on by default, so ``make dev`` keeps the pipeline up to date without clicking anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from bc_pipeline.defs.assets.ingest import observation_metadata
from bc_pipeline.defs.resources import ImageSource, PipelineStorage
from bc_pipeline.ingest.source_version import changed_entries, folder_stamps, snapshot, stamp_digest
from bc_pipeline.quality.label_review import NO_FILE, decisions_version

SOURCE_KEY = dg.AssetKey("raw_image_source")
DECISIONS_KEY = dg.AssetKey("label_decisions")

automation_sensor = dg.AutomationConditionSensorDefinition(
    "bc_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description=(
        "Evaluates every asset's automation condition (bc_pipeline/dagster_utils/automation.py) every 30 s and runs "
        "what changed data versions or code versions make out of date."
    ),
)


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Every 30 s: records an observation of raw_image_source when its content changed (a file added, "
        "removed or edited, in data/raw/ or wherever the source is), so bc_automation reruns the pipeline "
        "from raw_images. New files in data/raw/ that the pipeline does not read are reported here."
    ),
)
def raw_data_sensor(context: dg.SensorEvaluationContext, image_source: ImageSource, storage: PipelineStorage):
    try:
        source = image_source.resolve_path(storage.root)
    except ValueError as error:
        return dg.SkipReason(f"the image source is unusable: {error}")
    previous = json.loads(context.cursor) if context.cursor else {}
    recorded = _recorded_version(context.instance)
    state = {"source": str(source), "stamps": stamp_digest(source), "version": previous.get("version")}
    observation = None
    if state["stamps"] != previous.get("stamps") or state["source"] != previous.get("source"):
        seen = snapshot(source)
        state["version"] = seen.version
        # The first look at a never-observed source is a baseline: on a fresh instance, automation
        # starts from what is there (as Dagster's eager does), it does not rebuild it unasked.
        if seen.version != recorded and (previous or recorded is not None):
            observation = dg.AssetObservation(
                SOURCE_KEY, tags={"dagster/data_version": seen.version}, metadata=observation_metadata(seen)
            )
    raw_dir = storage.root / "raw"
    state["others"] = folder_stamps(raw_dir, skip=source)
    new_others = [name for name in changed_entries(previous.get("others", {}), state["others"]) if name in state["others"]]
    cursor = json.dumps(state)
    if observation is not None:
        context.log.info(f"{source} changed: observed version {state['version']}")
        return dg.SensorResult(asset_events=[observation], cursor=cursor)
    context.update_cursor(cursor)
    if new_others and previous:
        return dg.SkipReason(_not_read_message(raw_dir, new_others, image_source, source))
    if not previous and recorded is None:
        return dg.SkipReason(f"watching {source} (version {state['version']}); it changes the pipeline from the next change on")
    return dg.SkipReason(f"no change in {source} (version {state['version']})")


def _recorded_version(instance: dg.DagsterInstance) -> str | None:
    """The data version of the source's latest observation in this instance, if any."""
    record = instance.get_latest_data_version_record(SOURCE_KEY, is_source=True)
    return record.asset_observation.data_version if record and record.asset_observation else None


def _not_read_message(raw_dir: Path, names: list[str], image_source: ImageSource, source: Path) -> str:
    shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    return (
        f"new or changed in {raw_dir}: {shown}; the pipeline reads {image_source.kind} {source}. To use a "
        "new file, point it there (BC_SOURCE=npz|folder BC_SOURCE_PATH=<path>) and restart `make dev`."
    )



@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Every 30 s: records an observation of label_decisions when the decided rows of "
        "data/review/label_decisions.csv changed, so bc_automation reruns clean_images and what follows. "
        "The pipeline rewriting the undecided listing is not a change."
    ),
)
def label_review_sensor(context: dg.SensorEvaluationContext, storage: PipelineStorage):
    path = storage.label_review_file
    version = decisions_version(path)
    record = context.instance.get_latest_data_version_record(DECISIONS_KEY, is_source=True)
    recorded = record.asset_observation.data_version if record and record.asset_observation else None
    if version == (recorded or NO_FILE):
        return dg.SkipReason(f"no new decision in {path} (version {version})")
    context.log.info(f"{path}: decisions changed, observed version {version}")
    observation = dg.AssetObservation(DECISIONS_KEY, tags={"dagster/data_version": version},
                                      metadata={"path": dg.MetadataValue.path(str(path))})  # fmt: skip
    return dg.SensorResult(asset_events=[observation])
