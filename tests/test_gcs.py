"""A gs:// workdir end to end, on a fake Cloud Storage (tests/fake_gcs.py).

The smoke config's model trains 2 steps in `gs://bucket/run`, with its
data_dir, tokenizer, init_from source and TensorBoard events in the bucket
too, then `flamingo_jax.load` reads it back; the path string stays `gs://...` through
flamingo_jax.fs, orbax and tensorstore (which uploads over HTTP to the fake),
and nothing may land on the local disk. Before flamingo_jax.fs the
checkpointer made `<cwd>/gs:/bucket/run/checkpoints` of it and orbax
raised `ValueError: Invalid file path`.
"""

import json
import os
import time

import jax
import numpy as np
import pytest

import flamingo_jax
from experiments import tiny
from flamingo_jax import checkpoint as checkpoint_lib
from flamingo_jax import fs
from flamingo_jax.data import prepare
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.orchestration import plots
from flamingo_jax.orchestration import report
from flamingo_jax.training import loop
from flamingo_jax.training import metrics as metrics_lib
from flamingo_jax.training import optim
from flamingo_jax.training import workdir as workdir_lib
from tests import fake_gcs
from tests.evaluation import test_runner

RUN = 'gs://bucket/run'


@pytest.fixture(scope='module')
def gcs():
  """The fake, reached as a pod reaches GCS (see fake_gcs's docstring): by
  every client, TensorFlow's own (TensorBoard's event files) included."""
  fake = fake_gcs.FakeGcs()
  with pytest.MonkeyPatch.context() as monkeypatch:
    for key, value in fake.environment().items():
      monkeypatch.setenv(key, value)
    with fake_gcs.install_epath_backend(fake.backend):
      yield fake
  fake.close()


def test_paths_keep_their_scheme():
  assert fs.absolute('gs://b/w/') == 'gs://b/w'
  assert fs.join('gs://b/w', 'checkpoints', '3') == 'gs://b/w/checkpoints/3'
  assert fs.join('gs://b/w', 'gs://c/x') == 'gs://c/x'
  assert fs.join('/local/w', 'gs://c/x') == 'gs://c/x'
  assert fs.dirname('gs://b/w/checkpoints') == 'gs://b/w'
  assert fs.basename('gs://b/w/checkpoints/') == 'checkpoints'
  assert fs.normpath('gs://b/w/lm/../vision') == 'gs://b/w/vision'
  assert fs.relpath('gs://b/w/lm/metrics.jsonl', 'gs://b/w') == (
      'lm/metrics.jsonl')
  assert fs.absolute('rel') == os.path.abspath('rel')


def test_files_on_the_bucket(gcs):
  base = 'gs://bucket/files'
  fs.write_text(f'{base}/a/x.json', '{"step": 1}')
  assert fs.exists(f'{base}/a') and fs.isdir(f'{base}/a')
  assert fs.isfile(f'{base}/a/x.json') and not fs.isfile(f'{base}/a')
  assert fs.listdir(base) == ['a']
  fs.replace(f'{base}/a', f'{base}/b')
  assert not fs.exists(f'{base}/a')
  assert fs.read_text(f'{base}/b/x.json') == '{"step": 1}'
  assert not any(name.endswith('.partial') for name in gcs.files(base))


def test_metrics_on_the_bucket_drop_later_and_torn_rows(gcs):
  path = 'gs://bucket/metrics/metrics.jsonl'
  fs.write_text(path, '{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
  metrics_lib.drop_rows_after(path, 2)
  assert fs.read_text(path) == '{"step": 1}\n{"step": 2}\n'
  lines = metrics_lib._ObjectLines(path)  # pylint: disable=protected-access
  lines.write('{"step": 3}\n')
  lines.close()
  assert fs.read_text(path).splitlines()[-1] == '{"step": 3}'


def _lock_object(workdir, **fields):
  held = {'holder': 'pid 1 on host elsewhere', 'host': 'elsewhere', 'pid': 1,
          'token': 'theirs', 'renewed': time.time(), **fields}
  fs.write_text(fs.join(workdir, workdir_lib.LOCK_FILE), json.dumps(held))


def test_a_live_lock_object_refuses_a_second_trainer(gcs):
  workdir = 'gs://bucket/locked'
  _lock_object(workdir)
  with pytest.raises(workdir_lib.WorkdirLockedError,
                     match='pid 1 on host elsewhere'):
    with workdir_lib.lock(workdir):
      pass


@pytest.mark.parametrize('fields', [
    {'renewed': 0.0},  # Not renewed for ages: its holder is gone.
    {'host': os.uname().nodename, 'pid': 2**22 + 17},  # A dead pid here.
], ids=['stale', 'dead_pid'])
def test_an_abandoned_lock_object_is_taken_over_and_released(gcs, fields):
  workdir = f'gs://bucket/abandoned-{len(fields)}'
  _lock_object(workdir, **fields)
  lock = fs.join(workdir, workdir_lib.LOCK_FILE)
  with workdir_lib.lock(workdir):
    held = json.loads(fs.read_text(lock))
    assert held['pid'] == os.getpid() and held['token'] != 'theirs'
    with workdir_lib.lock(workdir):  # Re-entrant in a process.
      pass
    assert fs.exists(lock)
  assert not fs.exists(lock)


def _config(tokenizer: str):
  """The smoke model, one dataset, 2 steps, a checkpoint at each."""
  config = tiny.get_config('smoke')
  config.stages, config.init_from = {}, []
  config.data.datasets = {'pairs': config.data.datasets.pairs}
  config.data.datasets.pairs.batch_size = 8
  config.data.tokenizer = tokenizer
  config.total_steps, config.log_every = 2, 1
  config.checkpoint.every = 1
  return config


def _save_pretrained(config, path: str) -> dict[str, dict[str, np.ndarray]]:
  """Random weights (not the run's init) saved as a one-step run in `path`."""
  params = test_runner.random_params(config.model, seed=7)
  frozen = {k: v for k, v in params.items() if k.startswith('lm/')}
  saver = checkpoint_lib.Checkpointer(fs.join(path, 'checkpoints'),
                                      save_every=1, async_save=False)
  saver.save(1, {'frozen': frozen, 'trainable': {
      k: v for k, v in params.items() if k not in frozen}}, {}, force=True)
  saver.close()
  return frozen


def _events(logdir: str) -> dict[str, list[int]]:
  """tag -> steps of the TensorBoard event files in `logdir`, read back
  through TensorFlow's GCS client."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  steps = {}
  for path in tf.io.gfile.glob(f'{logdir}/events.out.tfevents.*'):
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      event = tf.compat.v1.Event.FromString(record)
      for value in event.summary.value:
        steps.setdefault(value.tag, []).append(event.step)
  return steps


def test_a_run_and_load_on_a_gs_workdir(gcs, tmp_path, monkeypatch):
  """Workdir, data_dir, tokenizer, init_from and TensorBoard all on gs://.

  The run builds the world's pairs into the bucket (ArrayRecord's writer
  only writes locally: built in a temporary directory, then uploaded),
  reads them back through ArrayRecord's own GCS client, and takes its LM
  from a pretrained run on the bucket.
  """
  monkeypatch.chdir(tmp_path)  # Where '<cwd>/gs:/...' would appear.
  tokenizer = 'gs://bucket/data/tokenizer.model'
  config = _config(tokenizer)
  config.data.data_dir, config.data.sizes = 'gs://bucket/data', 'tiny'
  config.init_from = [dict(workdir='gs://bucket/pretrained',
                           include=['lm/.*'], exclude=['lm/eoc_.*'])]
  pretrained = _save_pretrained(config, 'gs://bucket/pretrained')
  tokenizer_lib.Tokenizer.train(
      prepare.world_corpus(num_scenes=200, num_videos=50, num_documents=50),
      config.data.vocab_size, path=tokenizer)

  state = loop.train_and_evaluate(config, RUN, on_finished=plots.write_plots)

  files = set(gcs.files(RUN))
  for name in ('config.json', 'metrics.jsonl', 'finished.json',
               'plots/loss.png', 'checkpoints/1/commit_success.txt',
               'checkpoints/2/commit_success.txt',
               'checkpoints/2/state/manifest.ocdbt'):
    assert name in files, sorted(files)
  assert workdir_lib.LOCK_FILE not in files  # Released.
  assert os.listdir(tmp_path) == []  # Nothing local.
  # The arrays went through tensorstore's gcs driver, over HTTP.
  assert any(r.startswith('POST /upload/storage/v1/b/bucket/o')
             and 'checkpoints%2F2%2Fstate' in r for r in gcs.store.requests)
  assert [r['step'] for r in loop.read_metrics(RUN)] == [1, 2]
  assert _events(f'{RUN}/tensorboard')['loss'] == [1, 2]
  # The data: built into the bucket, read by ArrayRecord over HTTP.
  assert any(n.startswith('world_pairs-train.array_record') for n in
             gcs.files(f'gs://bucket/data/world_pairs/tiny/{prepare.WORLD_VERSION}'))
  assert any(r.startswith('GET /storage/v1/b/bucket/o/data%2Fworld_pairs')
             and 'alt=media' in r for r in gcs.store.requests)
  # init_from: the frozen LM is the pretrained one, not this run's init.
  for key, leaves in pretrained.items():
    if not key.startswith('lm/eoc_'):
      for name, value in leaves.items():
        np.testing.assert_array_equal(
            np.asarray(state.frozen[key][name], np.float32),
            np.asarray(value.astype(state.frozen[key][name].dtype),
                       np.float32))
  assert workdir_lib.finished_step(RUN) == 2
  assert workdir_lib.saved_config(RUN)['data']['tokenizer'] == tokenizer
  assert checkpoint_lib.saved_steps(RUN) == [1, 2]

  model = flamingo_jax.load(RUN)
  assert model.step == 2 and model.workdir == RUN
  trained = jax.tree.map(np.asarray, optim.merge(state.trainable,
                                                 state.frozen))
  jax.tree.map(np.testing.assert_array_equal, trained,
               jax.tree.map(np.asarray, model.params))
  assert flamingo_jax.load(f'{RUN}/checkpoints/1').step == 1

  path = report.write_report(RUN)
  assert path == f'{RUN}/report.md'
  assert '![main (Flamingo) loss.png](plots/loss.png)' in fs.read_text(path)
  assert os.listdir(tmp_path) == []
