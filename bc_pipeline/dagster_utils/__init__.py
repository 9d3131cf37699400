"""What the definitions in ``defs/`` share: automation conditions, partitions, versioned outputs,
config schemas derived from the library's settings, sample reuse and metadata helpers.

Dagster-specific, unlike ``lib/``; none of it defines an asset, job or sensor itself.
"""
