"""contsup.training: the training loop, its strategies, checkpoints and run directories."""
