"""Stage 2, data quality: perceptual hashes and duplicate groups (``hashing``, ``dedup``), colour
statistics (``colour``), blends of a cell and a template found by their exact algebra
(``blend_algebra``, ``blends``; the noise storage left, ``storage_noise``), outliers (``outliers``), and what goes on to training (``cleaning``)."""
