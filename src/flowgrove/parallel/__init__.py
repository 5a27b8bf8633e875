"""Parallelism (layer 6): process groups and collectives, the DDP/FSDP2 engines, rank faults, which rows each rank
holds. May import everything below it: root modules, math, tasks, policies, rewards, config."""
