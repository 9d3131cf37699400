"""Small helpers that turn pandas tables and PNGs into Dagster metadata."""

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from bc_pipeline.core.plots import markdown_image
from bc_pipeline.core.storage import save_bytes

# Metadata keys more than one module reads or writes, named once.
ARTIFACT_PATH = "artifact_path"  # where the IO manager stored an output (defs/resources.py writes it, reuse.py reads it)

_TYPES = {"i": "int", "u": "int", "f": "float", "b": "bool"}


def table(frame: pd.DataFrame, max_rows: int = 50) -> dg.MetadataValue:
    """A table shown as a sortable table on the asset page."""
    frame = frame.head(max_rows)
    columns = [dg.TableColumn(str(c), _TYPES.get(frame[c].dtype.kind, "string")) for c in frame.columns]
    records = [
        dg.TableRecord({str(k): _plain(v) for k, v in row.items()}) for row in frame.to_dict("records")
    ]
    return dg.MetadataValue.table(records=records, schema=dg.TableSchema(columns=columns))


def _plain(value):
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.floating):
        return round(float(value), 4)
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, (int, bool, str)) or value is None:
        return value
    return str(value)


def image(png: bytes, path: Path, alt: str) -> dict[str, dg.MetadataValue]:
    """Save the PNG under ``path`` and return metadata that shows it inline and links the file."""
    save_bytes(path, png)
    return {alt: dg.MetadataValue.md(markdown_image(png, alt)), f"{alt}_path": dg.MetadataValue.path(str(path))}
