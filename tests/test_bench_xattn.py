"""bench_xattn at toy sizes: it runs, and its two forms agree."""

from flamingo_jax import bench_xattn


def test_bench_xattn_times_two_forms_that_agree(capsys):
  results = bench_xattn.bench_xattn(
      [3], batch=2, length=16, width=16, heads=2, head_size=8,
      visual_tokens=4, group_size=4, repeats=1, clock='cpu')
  assert set(results) == {3}
  for figures in results.values():
    assert figures['max_difference'] < 1e-4
    assert figures['block_dense_s'] > 0 and figures['block_ratio'] > 0
  assert 'ratio' in capsys.readouterr().out
