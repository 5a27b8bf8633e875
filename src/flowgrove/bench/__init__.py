"""``flowgrove bench-model`` (layer 10): FLUX-shaped timing cases, random models of shipped configs, FLOP and memory
measurement. May import training and everything below; not recipes or the CLI."""
