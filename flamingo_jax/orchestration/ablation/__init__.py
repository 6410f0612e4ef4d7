"""The ablation sweep (`python -m flamingo_jax.ablate`): plan, sweep, table."""
