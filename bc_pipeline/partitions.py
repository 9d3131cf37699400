"""Partitions of the pipeline: one per model of the zoo (lib.zoo.REGISTRY)."""

import dagster as dg

from bc_pipeline.lib.zoo import REGISTRY

# Training and evaluation run once per model; the leaderboard compares them all.
model_partitions = dg.StaticPartitionsDefinition(list(REGISTRY))
