"""Image data: sets, sources, recipes, augmentation and the in-memory device path."""
