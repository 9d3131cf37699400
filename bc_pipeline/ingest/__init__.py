"""Stage 1, ingest: image sources (class folders, challenge ``.npz``, BloodMNIST) decoded into one
validated array and manifest; the default dataset's fetch; content versions of a source on disk."""
