"""Orchestration, the top room: what runs training and evaluation together.

  recipe.py     the stages, then the main stage, evaluation and the report
                (`python -m flamingo_jax.train`)
  ablation/     the ablation sweep: plan, sweep, table
                (`python -m flamingo_jax.ablate`)
  report.py     W/report.md (`python -m flamingo_jax.report`)
  plots.py      W/plots/*.png (`python -m flamingo_jax.plot`)

Every import points down (tests/test_layering.py): this room imports
training, evaluation and the rooms below them; nothing below imports it (the
training loop takes an `on_finished` hook for the plots instead).
"""
