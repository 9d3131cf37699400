"""Stage 4a, augmentation: the named presets (keras-cv layers and our own), the stored augmented
copies of the training set, and the perturbed validation/test copies (``presets``)."""
