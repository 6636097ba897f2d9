"""Training: the pretraining loop (`pretrain.pretrain(cfg)`), optimizer and schedules, batch sampling,
checkpoints, and distributed setup (DDP / FSDP2 under torchrun)."""
