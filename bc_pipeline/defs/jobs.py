"""Asset jobs: named selections that schedules, sensors and people launch.

The leaderboard and the submission are not in the model jobs: they read every model, so the
automation sensor refreshes them once after all scheduled model runs have finished, instead of
once per model.
"""

import dagster as dg

from bc_pipeline.dagster_utils.partitions import model_partitions
from bc_pipeline.recipes import load_recipe, recipe_names

observe_raw_source_job = dg.define_asset_job(
    "observe_raw_source",
    selection=dg.AssetSelection.assets("raw_image_source"),
    description="Observe the raw image source: record the content version of the files on disk.",
)

nightly_evaluation_job = dg.define_asset_job(
    "nightly_evaluation",
    selection=dg.AssetSelection.assets("evaluation_report", "domain_shift_report"),
    partitions_def=model_partitions,
    description=(
        "Re-evaluate one trained model (a partition) on the current test, robustness and lab-shift sets: "
        "clean and robust accuracy, TTA, confusion matrix, Grad-CAM, other labs' cells."
    ),
)

weekly_retrain_job = dg.define_asset_job(
    "weekly_retrain",
    selection=dg.AssetSelection.assets("trained_model", "evaluation_report", "domain_shift_report"),
    partitions_def=model_partitions,
    description=(
        "Retrain one model (a partition) from scratch on the current balanced and augmented sets, "
        "then evaluate it. Training runs in the 'gpu' pool: one at a time."
    ),
)



def recipe_job(name: str):
    """The whole graph with a shipped recipe's run config (bc_pipeline/recipes/), one model per run.

    The launchpad opens with the recipe's config; pick a model partition (a backfill of several
    partitions trains each of the recipe's models).
    """
    recipe = load_recipe(name)
    return dg.define_asset_job(
        f"recipe_{name.replace('-', '_')}",
        selection=dg.AssetSelection.all(),
        partitions_def=model_partitions,
        config=recipe.run_config or None,
        description=f"Recipe '{name}' ({recipe.path.name}): {recipe.description} Models: {', '.join(recipe.models)}.",
    )


recipe_jobs = [recipe_job(name) for name in recipe_names()]
all_jobs = [observe_raw_source_job, nightly_evaluation_job, weekly_retrain_job, *recipe_jobs]
