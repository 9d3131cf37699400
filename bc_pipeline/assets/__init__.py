"""Software-defined assets, one module per stage: ingest -> dedup -> splits -> training -> evaluation."""

import warnings

import dagster as dg

# Data versions on outputs, observable sources and source selections are how unchanged results
# stop downstream work; Dagster marks those APIs beta. Filtered here, before any asset module loads.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
