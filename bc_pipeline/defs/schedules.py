"""Schedules: a nightly evaluation refresh and a weekly retrain, one run per trained model.

Both find the models to run from the instance (the ``trained_model`` partitions that were ever
materialized), so they never start training a zoo model nobody asked for. Times are UTC.
"""

from datetime import datetime, timezone

import dagster as dg

from bc_pipeline.defs import jobs
from bc_pipeline.models.zoo import CUSTOM_CNN

NIGHTLY_EVALUATION_CRON = "0 2 * * *"  # 02:00 every day
WEEKLY_RETRAIN_CRON = "0 3 * * 0"  # 03:00 every Sunday


def trained_models(instance: dg.DagsterInstance) -> list[str]:
    """Model partitions of ``trained_model`` that have been materialized at least once, sorted."""
    return sorted(instance.get_materialized_partitions(dg.AssetKey("trained_model")))


def _per_model(context: dg.ScheduleEvaluationContext, models: list[str], what: str):
    if not models:
        return dg.SkipReason(f"no trained model yet: nothing to {what} (materialize trained_model first)")
    stamp = _tick_time(context).strftime("%Y-%m-%dT%H:%M")
    return [dg.RunRequest(run_key=f"{what}-{model}-{stamp}", partition_key=model) for model in models]


def _tick_time(context: dg.ScheduleEvaluationContext) -> datetime:
    """The tick's scheduled time; now for a context built by hand, which has none."""
    try:
        return context.scheduled_execution_time
    except Exception:  # dagster raises a CheckError when no time was set
        return datetime.now(timezone.utc)


@dg.schedule(
    job=jobs.nightly_evaluation_job,
    cron_schedule=NIGHTLY_EVALUATION_CRON,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every night at 02:00 UTC: re-evaluate every trained model; the leaderboard follows by automation.",
)
def nightly_evaluation(context: dg.ScheduleEvaluationContext):
    return _per_model(context, trained_models(context.instance), "evaluate")


@dg.schedule(
    job=jobs.weekly_retrain_job,
    cron_schedule=WEEKLY_RETRAIN_CRON,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description=(
        "Sundays at 03:00 UTC: retrain and re-evaluate every trained model (the default model if none "
        "is trained yet), one training at a time. Off by default: turn it on where a GPU makes it cheap."
    ),
)
def weekly_retrain(context: dg.ScheduleEvaluationContext):
    return _per_model(context, trained_models(context.instance) or [CUSTOM_CNN], "retrain")

