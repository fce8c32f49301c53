"""Layer 2, the method: losses and objectives, negative sources, backbones, heads and encoders,
the step in the paper's order, and the schedules. Knows nothing of where inputs come from: a
view is a tensor (B, ...) or a dict of such tensors."""
