"""Training (layer 7): a config becomes step plans (``method``), rollouts, credit, the trainer component, held-out
sampling, prompt data and the policy setup. May import every lower layer (math to parallel); no I/O of runs."""
