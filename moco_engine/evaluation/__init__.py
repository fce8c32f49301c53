"""Layer 4, evaluation: feature extraction, the weighted kNN monitor, top-k accuracy, the linear
probe, and exporting a backbone to torchvision and detectron2."""
