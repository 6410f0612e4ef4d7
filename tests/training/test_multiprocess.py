"""Two processes on localhost train exactly like one (jax.distributed, gloo).

Runs `tests/training/multiprocess_worker.py` three times, concurrently, as
subprocesses: two processes of one cluster (2 CPU devices each, coordinator
and gloo collectives on 127.0.0.1) sharing a workdir, and a single process
with all 4 devices as the reference. Each process feeds only its own rows of
every global batch, so the two runs see the same global batches and must end
with the same losses and parameters.
"""

import glob
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from flamingo_jax import checkpoint as checkpoint_lib
from tests.training import multiprocess_worker as worker

pytestmark = pytest.mark.slow

_REPO = pathlib.Path(__file__).resolve().parents[2]
_LOCAL_DEVICES = 2  # Per process of the 2-process run.
_NUM_PROCESSES = 2
_TIMEOUT_S = 600  # For all three runs together.


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir: pathlib.Path, *, num_processes: int, process_id: int,
            local_devices: int, coordinator: str | None,
            log: pathlib.Path) -> subprocess.Popen:
  """Starts one worker process; its output goes to `log`."""
  env = dict(os.environ)
  env.update(
      JAX_PLATFORMS='cpu',
      JAX_NUM_CPU_DEVICES=str(local_devices),  # XLA_FLAGS: conftest.py's.
      PYTHONPATH=os.pathsep.join(
          p for p in (str(_REPO), env.get('PYTHONPATH')) if p))
  command = [sys.executable, '-m', 'tests.training.multiprocess_worker',
             '--num_processes', str(num_processes),
             '--process_id', str(process_id), '--workdir', str(workdir)]
  if coordinator:
    command += ['--coordinator', coordinator]
  with open(log, 'w') as f:
    return subprocess.Popen(command, cwd=_REPO, env=env, stdout=f,
                            stderr=subprocess.STDOUT)


def _tail(log: pathlib.Path, lines: int = 40) -> str:
  return ''.join(log.read_text(errors='replace').splitlines(True)[-lines:])


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Runs the 2-process cluster and the 1-process reference to the end."""
  root = tmp_path_factory.mktemp('multiprocess')
  distributed, reference = root / 'distributed', root / 'reference'
  coordinator = f'127.0.0.1:{_free_port()}'
  procs = {}
  for index in range(_NUM_PROCESSES):
    procs[f'process_{index}'] = _launch(
        distributed, num_processes=_NUM_PROCESSES, process_id=index,
        local_devices=_LOCAL_DEVICES, coordinator=coordinator,
        log=root / f'process_{index}.log')
  procs['reference'] = _launch(
      reference, num_processes=1, process_id=0,
      local_devices=_NUM_PROCESSES * _LOCAL_DEVICES, coordinator=None,
      log=root / 'reference.log')
  deadline = time.monotonic() + _TIMEOUT_S
  try:
    returncodes = {name: proc.wait(timeout=max(deadline - time.monotonic(), 1))
                   for name, proc in procs.items()}
  except subprocess.TimeoutExpired:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    pytest.fail(f'Runs did not finish within {_TIMEOUT_S} s:\n' + '\n'.join(
        f'--- {name}:\n{_tail(root / f"{name}.log")}' for name in procs))
  return dict(distributed=distributed, reference=reference,
              returncodes=returncodes,
              logs={name: root / f'{name}.log' for name in procs})


@pytest.fixture(scope='module')
def finished(runs):
  for name, code in runs['returncodes'].items():
    if code != 0:
      pytest.fail(f'{name} exited with {code}:\n{_tail(runs["logs"][name])}')
  return runs


def _params(path: pathlib.Path) -> dict[str, np.ndarray]:
  with np.load(path) as data:
    return dict(data)


def _trainable(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: v for k, v in params.items() if not k.startswith('_')}


def test_all_processes_exit_cleanly(runs):
  for name, code in runs['returncodes'].items():
    assert code == 0, f'{name} exited with {code}:\n{_tail(runs["logs"][name])}'


def test_processes_formed_one_cluster(finished):
  for index in range(_NUM_PROCESSES):
    params = _params(finished['distributed'] / f'params_{index}.npz')
    assert int(params['_process_count']) == _NUM_PROCESSES
    assert int(params['_device_count']) == _NUM_PROCESSES * _LOCAL_DEVICES
    assert int(params['_step']) == worker.TOTAL_STEPS
  reference = _params(finished['reference'] / 'params_0.npz')
  assert int(reference['_process_count']) == 1
  assert int(reference['_device_count']) == _NUM_PROCESSES * _LOCAL_DEVICES


def test_losses_match_single_process_run(finished):
  rows = [json.loads(line) for line in
          (finished['distributed'] / 'metrics.jsonl').read_text().splitlines()]
  expected = [json.loads(line) for line in
              (finished['reference'] / 'metrics.jsonl').read_text()
              .splitlines()]
  # One row per step: process 1 wrote none.
  assert [row['step'] for row in rows] == list(
      range(1, worker.TOTAL_STEPS + 1))
  np.testing.assert_allclose([row['loss'] for row in rows],
                             [row['loss'] for row in expected],
                             rtol=1e-5, atol=1e-6)
  # Every token of the global batch was seen (no rows lost or duplicated).
  np.testing.assert_array_equal(
      [row['supervised_tokens/pairs'] for row in rows],
      [row['supervised_tokens/pairs'] for row in expected])


def test_parameters_match_single_process_run(finished):
  reference = _trainable(_params(finished['reference'] / 'params_0.npz'))
  # The gates start at 0; they moved, so the runs trained.
  assert np.all(reference['gated_xattn/block/attn_gate'] != 0)
  per_process = [_trainable(_params(finished['distributed'] /
                                    f'params_{index}.npz'))
                 for index in range(_NUM_PROCESSES)]
  for params in per_process:
    assert params.keys() == reference.keys()
    for name, value in params.items():
      np.testing.assert_allclose(value, reference[name], rtol=1e-4,
                                 atol=1e-6, err_msg=name)
  for name, value in per_process[0].items():
    np.testing.assert_array_equal(value, per_process[1][name], err_msg=name)


def test_only_process_0_writes_logs(finished):
  workdir = finished['distributed']
  events = glob.glob(str(workdir / 'tensorboard' / 'events.out.tfevents.*'))
  assert len(events) == 1, events
  assert json.loads((workdir / 'config.json').read_text())['total_steps'] == (
      worker.TOTAL_STEPS)
  steps = [json.loads(line)['step'] for line in
           (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert len(steps) == len(set(steps)), steps  # Not once per process.


def test_checkpoints_written_once_per_interval(finished):
  directory = finished['distributed'] / 'checkpoints'
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  assert steps == list(range(worker.CHECKPOINT_EVERY, worker.TOTAL_STEPS + 1,
                             worker.CHECKPOINT_EVERY))
  last = directory / str(worker.TOTAL_STEPS)
  assert (last / 'state').is_dir()
  data = json.loads((last / 'data' / 'metadata').read_text())
  assert data == {'next_step': worker.TOTAL_STEPS}
  assert not list(directory.glob('*.orbax-checkpoint-tmp*'))


def test_checkpoint_loads_on_another_topology(finished):
  loaded = checkpoint_lib.load_params(str(finished['distributed']))
  final = _trainable(_params(finished['distributed'] / 'params_0.npz'))
  for name, value in final.items():
    module, param = name.rsplit('/', 1)
    np.testing.assert_array_equal(loaded[module][param], value, err_msg=name)
