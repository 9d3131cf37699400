"""Partitions of the pipeline: one per model of the zoo (models.zoo.REGISTRY), and the ensemble."""

import dagster as dg

from bc_pipeline.models.zoo import MODEL_NAMES

# Training and evaluation run once per model; the leaderboard compares them all.
model_partitions = dg.StaticPartitionsDefinition(list(MODEL_NAMES))
