"""When the pipeline updates itself: the declarative automation conditions of every asset.

One rule for every stage (``on_change``, applied in ``bc_pipeline/definitions.py`` to every asset
that does not state its own): an asset is requested when

- the *data version* of one of its inputs changed (not merely a rerun: an upstream rerun that
  produced identical content keeps its data version and so triggers nothing), or an input will
  be requested on the same tick (so a change flows down the chain in one run per partitioning:
  the data stages, then each trained model with its evaluation, then leaderboard and submission);
- its own code version changed (``code_version`` in the decorator, which for configurable
  stages includes a fingerprint of the config defaults, see ``dagster_utils.versions``);
- it went missing after automation started watching it (deleted from the UI, say);

and never while an input is missing, in progress, or failed its latest run and is not being
retried on this tick, nor while the asset itself is in progress.

Two refinements keep the rule affordable:

- models (``trained_model`` partitions) are kept up to date only once a person trained them
  (``per_model``): a new upstream version does not start training every model of the zoo, and
  training runs in the ``gpu`` pool, one at a time. ``evaluation_report`` needs no such rule: a
  missing model is a missing input, so it waits, and evaluates a model as soon as one is trained;
- the leaderboard and the submission compare the models that exist (``across_models``): missing
  model partitions do not block them, but at least one must exist.

The raw image source has no condition: ``raw_data_sensor`` (``sensors.py``) records an observation
of it within 30 s of a change on disk, and 'Observe sources' in the UI does on demand.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

AC = dg.AutomationCondition


def deps_changed() -> dg.AutomationCondition:
    """An input's data version changed (outside a run that also ran this asset), or it is requested now."""
    changed_elsewhere = (AC.data_version_changed() & ~AC.executed_with_root_target()).with_label(
        "data_version_changed"
    )
    return AC.any_deps_match(changed_elsewhere | AC.will_be_requested()).with_label("any_deps_changed")


def _deps_failed() -> dg.AutomationCondition:
    return AC.any_deps_match(AC.execution_failed() & ~AC.will_be_requested()).with_label("any_deps_failed")


def _triggered(ignore: Sequence[str] = ()) -> dg.AutomationCondition:
    changed = deps_changed().ignore(dg.AssetSelection.assets(*ignore)) if ignore else deps_changed()
    return (AC.newly_missing() | changed | AC.code_version_changed()).since_last_handled()


def _not_blocked() -> dg.AutomationCondition:
    return ~AC.any_deps_in_progress() & ~_deps_failed() & ~AC.in_progress()


def on_change(optional: Sequence[str] = ()) -> dg.AutomationCondition:
    """Eager on data versions and code versions; waits for missing, running or failed inputs.

    ``optional``: inputs that may be missing, observed sources that exist only once a person makes
    them (``label_decisions``: no review file yet is no decision, not a reason to wait). Dagster
    counts a never-observed source as missing.
    """
    missing = AC.any_deps_missing().ignore(dg.AssetSelection.assets(*optional)) if optional else AC.any_deps_missing()
    return (_triggered() & ~missing & _not_blocked()).with_label("on_change")


def per_model() -> dg.AutomationCondition:
    """``on_change`` for the trained_model partitions that exist: new models are trained on request only."""
    return (on_change() & ~AC.missing()).with_label("on_change_of_trained_models")


def across_models(model_assets: Sequence[str], *, after_ranking: bool = False) -> dg.AutomationCondition:
    """``on_change`` for an asset that reads every partition of ``model_assets``.

    Missing model partitions are the normal case (few of the zoo are trained) and must not block
    it, but it needs at least one model to compare. ``after_ranking`` is for an asset that also
    reads the leaderboard: model changes reach it only through the leaderboard (every new model
    changes the ranking), so it runs once, after the ranking, not before it with a stale ranking
    and again after.
    """
    models = dg.AssetSelection.assets(*model_assets)
    others_missing = AC.any_deps_missing().ignore(models)
    some_model = AC.any_deps_match(~AC.missing() | AC.will_be_requested()).allow(models).with_label("any_model_exists")
    triggered = _triggered(ignore=list(model_assets) if after_ranking else [])
    return (triggered & ~others_missing & some_model & _not_blocked()).with_label("on_change_of_any_model")
