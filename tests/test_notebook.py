"""notebooks/flamingo_tour.ipynb runs top to bottom (nbclient, python3 kernel)
against the smoke workdir, so that it cannot rot."""

import os
import pathlib

import nbclient
import nbformat

NOTEBOOK = (pathlib.Path(__file__).resolve().parents[1] / 'notebooks' /
            'flamingo_tour.ipynb')


def test_notebook_is_committed_clean():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None


def test_notebook_runs(smoke_workdir, monkeypatch, tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel inherits the environment: the smoke run, one CPU device (as
  # on a laptop) and ipykernel's inline matplotlib.
  monkeypatch.setenv('FLAMINGO_JAX_WORKDIR', str(smoke_workdir))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('JAX_NUM_CPU_DEVICES', '1')
  monkeypatch.delenv('MPLBACKEND', raising=False)
  # Unoptimised XLA code halves the compile times, which are nearly all the
  # notebook's run time with a model this small.
  monkeypatch.setenv('XLA_FLAGS', ' '.join(filter(None, [
      os.environ.get('XLA_FLAGS'), '--xla_backend_optimization_level=0'])))
  client = nbclient.NotebookClient(
      notebook, kernel_name='python3', timeout=300,
      resources={'metadata': {'path': str(tmp_path)}})
  client.execute()
  outputs = [output for cell in notebook.cells if cell.cell_type == 'code'
             for output in cell.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  text = ''.join(o.get('text', '') for o in outputs)
  for expected in ('generated:', 'prompt:', 'expected:'):
    assert expected in text
  assert 'Model(step=1' in ''.join(
      str(o.get('data', {}).get('text/plain', '')) for o in outputs)
  # Five figures inline: caption, VQA, video, support, queries.
  assert sum('image/png' in o.get('data', {}) for o in outputs) >= 5
