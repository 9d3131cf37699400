"""bc_pipeline: a declarative Dagster pipeline for blood-cell image classifiers.

`bc_pipeline.lib` holds the pure logic (no Dagster); `bc_pipeline.assets` wraps it as
software-defined assets; `bc_pipeline.definitions` assembles everything for `dagster dev`.
"""
