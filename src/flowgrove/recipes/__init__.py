"""Recipes (layer 11): ``train``, ``sample``/``eval``, ``pretrain``, ``bench`` build the components from a config and
hand them in (torchtune's recipe/component split). May import every layer below; only the CLI imports recipes."""
