"""Software-defined assets, one module per stage: ingest -> dedup -> splits -> training -> evaluation."""
