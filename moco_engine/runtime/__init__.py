"""Layer 1, runtime: the process group (torchrun, gathers, shuffle-BN's permutation), the device,
precision and memory format, random states, and moving a batch (a tensor or a dict of tensors)
to the device."""
