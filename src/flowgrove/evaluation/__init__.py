"""Evaluation (layer 9): held-out metrics (``evaluate``), the reward-hacking guard, diversity, and the run's monitor
that writes them. May import runs, training and everything below."""
