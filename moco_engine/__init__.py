"""moco_engine: momentum-contrast (MoCo) self-supervised pretraining on PyTorch."""

__version__ = "0.1.0"
