"""Reuse a random stage's stored sample when nothing it is computed from has changed.

The augmentation stages draw random samples, and keras-cv does not reproduce them from a seed (see
``lib.augmentation.make_augmenter``), so a rerun with identical inputs would store a new sample
under a new data version, and every model downstream would retrain for nothing. Automation reruns
such a stage whenever something upstream is requested on the same tick, before anyone can know
the upstream output came out identical. So before drawing, the stage asks: are the input data
versions, the code version and the config exactly those of the stored sample? If so it returns
that sample again (same content, same data version) and the chain stops there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dagster as dg

CONFIG_FINGERPRINT = "config_fingerprint"
_INPUT_TAG = "dagster/input_data_version/"


def config_fingerprint(config: dg.Config) -> str:
    """A short digest of a run's config values (recorded on each materialization)."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def unchanged_stored_output(context: dg.AssetExecutionContext, config: dg.Config) -> Path | None:
    """The artifact of the latest materialization if this run would compute it from the same
    inputs (data versions), code version and config; None when anything differs or is unknown."""
    key = context.asset_key
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return None
    stored = event.asset_materialization
    recorded = stored.metadata.get(CONFIG_FINGERPRINT)
    if recorded is None or recorded.value != config_fingerprint(config):
        return None
    if stored.tags.get("dagster/code_version") != context.assets_def.code_versions_by_key.get(key):
        return None
    for upstream in context.assets_def.asset_deps[key]:
        latest = context.instance.get_latest_data_version_record(upstream)
        current = latest.asset_materialization.tags.get("dagster/data_version") if latest and latest.asset_materialization else None
        if current is None or stored.tags.get(_INPUT_TAG + upstream.to_user_string()) != current:
            return None
    path = stored.metadata.get("artifact_path")
    return Path(path.value) if path is not None and Path(path.value).exists() else None
