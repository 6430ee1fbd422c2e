"""Training: state, flow-matching loss, the pure jitted step, checkpoints, metrics, the loop and CLI."""
