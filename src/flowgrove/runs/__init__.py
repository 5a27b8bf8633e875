"""Runs (layer 8): run folders, checkpoints (sharded), metrics and the reward curve, the HTML report, export to
diffusers and the model card. May import training and everything below it."""
