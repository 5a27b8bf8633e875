"""GRPO math (layer 2): step plans and rollout specs, tree shape/fusion/pruning, advantages, losses, trained-step
selection. Pure torch: may import torch, ``flowgrove.samplers`` and the root ``messages``/``registry`` only."""
