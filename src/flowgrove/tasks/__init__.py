"""Embedded tasks (layer 3): the data, prompts and shipped weight files of the built-in tasks (``digits``,
``numbers``) and their table (``catalog``).
May import torch, the math layer (``samplers``, ``grpo``) and the root modules; never a policy, reward or config."""
