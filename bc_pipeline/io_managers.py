"""Stores every asset's value under ``<data_dir>/assets/`` in the formats of lib.artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg

from bc_pipeline.lib.artifacts import read_artifact, write_artifact


class ArtifactIOManager(dg.ConfigurableIOManager):
    """Arrays as .npy, tables as Parquet, image sets as folders, models as .keras; atomic writes."""

    base_dir: str

    def _base(self, asset_key: dg.AssetKey) -> Path:
        return Path(self.base_dir).joinpath(*asset_key.path)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        path = write_artifact(self._base(context.asset_key), obj)
        context.add_output_metadata({"artifact_path": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> Any:
        return read_artifact(self._base(context.asset_key), what=context.asset_key.to_user_string())
