"""What every stage shares: atomic storage and fingerprints, the artifact formats (image sets,
shards, model folders), work in chunks over processes, processes that end with their parent, the
class names, and the figures. Imports nothing else of bc_pipeline, and no Dagster."""
