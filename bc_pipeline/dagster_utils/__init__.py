"""What the definitions in ``defs/`` share: automation conditions, partitions, versioned outputs and
the config classes' link to the library's settings (``versions``), sample reuse, metadata helpers,
the worker's launch and its events in the run log (``launch``, ``progress``), the instance and runs.

Dagster-specific, unlike the stage packages below it; none of it defines an asset, job or sensor itself.
"""
