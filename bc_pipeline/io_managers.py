"""Stores every asset's value under ``<data_dir>/assets/`` in the formats of lib.artifacts.

A partitioned asset keeps one artifact per partition: ``assets/<asset>/<partition>``. An input
that asks for all partitions of an upstream asset (``AssetIn(metadata={"all_partitions": True})``)
gets a lazy mapping from partition key to value, holding only the partitions that are stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg

from bc_pipeline.lib.artifacts import PartitionedArtifacts, read_artifact, write_artifact

ALL_PARTITIONS = {"all_partitions": True}


class ArtifactIOManager(dg.ConfigurableIOManager):
    """Arrays as .npy, tables as Parquet, image sets as folders, models as .keras; atomic writes."""

    base_dir: str

    def _base(self, asset_key: dg.AssetKey) -> Path:
        return Path(self.base_dir).joinpath(*asset_key.path)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        base = self._base(context.asset_key)
        if context.has_asset_partitions:
            base = base / context.asset_partition_key
        path = write_artifact(base, obj)
        context.add_output_metadata({"artifact_path": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> Any:
        base, what = self._base(context.asset_key), context.asset_key.to_user_string()
        if not context.has_asset_partitions:
            return read_artifact(base, what=what)
        keys = list(context.asset_partition_keys)
        if (context.definition_metadata or {}).get("all_partitions"):
            stored = PartitionedArtifacts(base, keys, what=what)
            if stored.missing:
                context.log.warning(f"{what}: partitions not materialized yet, left out: {', '.join(stored.missing)}")
            return stored
        if len(keys) != 1:
            raise ValueError(f"{what}: expected one partition, got {len(keys)}; mark the input all_partitions")
        return read_artifact(base / keys[0], what=f"{what}[{keys[0]}]")
