"""Launch scripts parse as bash (CI has no TPU pod or Slurm to run them)."""

import pathlib
import subprocess

import pytest

SCRIPTS = sorted(pathlib.Path('launch').glob('*.sh')) + sorted(
    pathlib.Path('launch').glob('*.sbatch'))


def test_scripts_exist():
  assert {p.name for p in SCRIPTS} == {'run_tpu.sh', 'tpu_pod.sh',
                                       'slurm_gpu.sbatch', 'bench_gpu.sh'}


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash(script):
  result = subprocess.run(['bash', '-n', str(script)], capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stderr
  text = script.read_text()
  if script.name == 'tpu_pod.sh':  # Delegates to run_tpu.sh on each worker.
    assert 'launch/run_tpu.sh' in text and '--worker=all' in text
  elif script.name == 'bench_gpu.sh':  # One host (tests/test_bench.py).
    assert 'flamingo_jax.bench' in text
  else:
    assert 'FLAMINGO_JAX_DISTRIBUTED=1' in text
