"""Training: TrainState, the pure step, the loop, optimizer and parameter rules, checkpoints,
the momentum encoder, metric writers and initialisation from earlier weights."""
