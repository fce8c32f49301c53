"""Layer 5, the run: the Trainer and its stop-and-cadence policy, checkpoints and the state they
hold, the run folder and its lock, stop signals, tracking (metrics.jsonl, console, W&B), plots."""
