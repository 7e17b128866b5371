"""contsup.distributed.world: torch.distributed: the process group, data-parallel and pipeline training."""
