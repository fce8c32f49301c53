"""Layer 3, data: the data sources (a registry), image sets, view recipes (a registry), sampling,
the batched augmentation and the device pipeline, and the loaders a run reads, evaluation's
included."""
