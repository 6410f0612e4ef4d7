"""The launch scripts, through their dry runs (CI has no gcloud, xpk or Slurm).

A dry run prints every command it would run, one shell-quoted line each (and
`# ...` notes). The tests split those lines as a shell would, check the
accelerator type, worker and node counts, and follow the module's arguments
through every shell they cross -- for a TPU slice, the workers' shell is
played by a real bash running the printed remote command against a stub
checkout -- to the final `python -m`, where they must arrive unchanged.
A run with stub `gcloud`/`xpk`/`sbatch` programs on the PATH checks that the
real run issues exactly the commands the dry run prints.
"""

import os
import pathlib
import shlex
import shutil
import subprocess
import tarfile

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / 'launch'
ENTRY_SCRIPTS = ('tpu_pod.sh', 'run_tpu.sh', 'xpk.sh', 'slurm_gpu.sh',
                 'slurm_gpu.sbatch')
# What a user would pass: a value with a space, one with quotes inside an
# override, a path with a space and a quote, and a glob that must not expand.
ARGS = ['flamingo_jax.train', '--config', 'experiments/flamingo.py:3B',
        '--workdir', 'gs://bucket/runs/3b run',
        "--config.x='a b'",
        "--config.data.tokenizer=/data/my dir/it's.model",
        '--config.data.datasets.m3w.builder=interleaved_jsonl/*',
        '--config.note=$HOME "quoted" `tick`']


def _run(script: str, *args: str, env=None, cwd=None
         ) -> subprocess.CompletedProcess:
  full_env = dict(os.environ, **(env or {}))
  full_env.pop('FLAMINGO_LAUNCH_DRY_RUN', None)
  full_env.update(env or {})
  return subprocess.run(['bash', str(LAUNCH / script), *args],
                        capture_output=True, text=True, env=full_env,
                        cwd=cwd, check=False, timeout=60)


def _dry_run(script: str, *args: str, env=None):
  """(commands as argv lists, notes) of a dry run that must succeed."""
  result = _run(script, '--dry-run', *args, env=env)
  assert result.returncode == 0, result.stderr
  commands, notes = [], []
  for line in result.stdout.splitlines():
    if line.startswith('# '):
      notes.append(line[2:])
    elif line.strip():
      commands.append(shlex.split(line))
  return commands, notes


def _command(commands, *prefix):
  found = [c for c in commands if c[:len(prefix)] == list(prefix)]
  assert len(found) == 1, (prefix, commands)
  return found[0]


def _flag(command, name):
  values = [a.split('=', 1)[1] for a in command if a.startswith(name + '=')]
  assert len(values) == 1, (name, command)
  return values[0]


def _worker_side(remote_command: str, tmp_path) -> list[str]:
  """The commands run_tpu.sh would run after `remote_command` reaches a
  worker, whose shell is bash with HOME=tmp_path and the copied checkout."""
  home = tmp_path / 'home'
  (home / 'flamingo_venv' / 'bin').mkdir(parents=True)
  with tarfile.open(home / 'flamingo_jax.tgz', 'w:gz') as bundle:
    for name in ('run_tpu.sh', '_lib.sh'):
      bundle.add(LAUNCH / name, arcname=f'launch/{name}')
  result = subprocess.run(
      ['bash', '-c', remote_command], capture_output=True, text=True,
      check=False, timeout=60,
      env=dict(os.environ, HOME=str(home), FLAMINGO_LAUNCH_DRY_RUN='1'))
  assert result.returncode == 0, result.stderr
  lines = [l for l in result.stdout.splitlines()
           if l.strip() and not l.startswith('#')]
  return shlex.split(lines[-1])


def test_entry_scripts_exist_and_parse():
  for name in ENTRY_SCRIPTS + ('_lib.sh', 'bench_gpu.sh'):
    result = subprocess.run(['bash', '-n', str(LAUNCH / name)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, (name, result.stderr)


@pytest.mark.parametrize('script', ['tpu_pod.sh', 'run_tpu.sh', 'xpk.sh',
                                    'slurm_gpu.sh'])
def test_help(script):
  result = _run(script, '--help')
  assert result.returncode == 0 and '--dry-run' in result.stdout, result


def test_tpu_v4_32(tmp_path):
  commands, notes = _dry_run(
      'tpu_pod.sh', '--name', 'my-v4', '--zone', 'us-central2-b',
      '--type', 'v4-32', '--create', '--', *ARGS)
  create = _command(commands, 'gcloud', 'compute', 'tpus', 'queued-resources',
                    'create', 'my-v4')
  assert _flag(create, '--accelerator-type') == 'v4-32'
  assert _flag(create, '--node-id') == 'my-v4'
  assert _flag(create, '--runtime-version') == 'tpu-ubuntu2204-base'
  assert '--spot' not in create
  assert any('16 chips on 4 workers' in n for n in notes), notes
  copy = _command(commands, 'gcloud', 'compute', 'tpus', 'tpu-vm', 'scp')
  ssh = _command(commands, 'gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh',
                 'my-v4')
  for command in (copy, ssh):  # Every worker gets the code and starts.
    assert '--worker=all' in command
    assert _flag(command, '--zone') == 'us-central2-b'
  worker = _worker_side(_flag(ssh, '--command'), tmp_path)
  python = str(tmp_path / 'home' / 'flamingo_venv' / 'bin' / 'python')
  assert worker == ['env', 'FLAMINGO_JAX_DISTRIBUTED=1', python, '-m', *ARGS]


def test_tpu_v5p_128_spot_without_copy(tmp_path):
  commands, notes = _dry_run(
      'tpu_pod.sh', '--name=pod', '--zone=us-east5-a', '--project=p',
      '--type=v5p-128', '--create', '--spot', '--no-copy', *ARGS)
  create = _command(commands, 'gcloud', 'compute', 'tpus', 'queued-resources',
                    'create', 'pod')
  assert _flag(create, '--accelerator-type') == 'v5p-128'
  assert _flag(create, '--runtime-version') == 'v2-alpha-tpuv5'
  assert _flag(create, '--project') == 'p' and '--spot' in create
  assert any('64 chips on 16 workers' in n for n in notes), notes
  assert not [c for c in commands if 'scp' in c]
  ssh = _command(commands, 'gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod')
  assert '--worker=all' in ssh
  # --no-copy: the checkout is already there.
  checkout = tmp_path / 'home' / 'flamingo_jax' / 'launch'
  checkout.mkdir(parents=True)
  for name in ('run_tpu.sh', '_lib.sh'):
    shutil.copy(LAUNCH / name, checkout / name)
  worker = _worker_side(_flag(ssh, '--command'), tmp_path)
  assert worker[:2] == ['env', 'FLAMINGO_JAX_DISTRIBUTED=1']
  assert worker[3:] == ['-m', *ARGS]


def test_xpk_v5p_128_multislice():
  commands, notes = _dry_run(
      'xpk.sh', '--cluster', 'big', '--type', 'v5p-128', '--num-slices', '2',
      '--workload', 'run-1', '--zone', 'us-east5-a', '--', *ARGS)
  create = _command(commands, 'xpk', 'workload', 'create')
  assert _flag(create, '--tpu-type') == 'v5p-128'
  assert _flag(create, '--num-slices') == '2'
  assert _flag(create, '--cluster') == 'big'
  assert _flag(create, '--workload') == 'run-1'
  assert _flag(create, '--script-dir') == str(LAUNCH.parent)
  assert any('128 chips, 32 containers (16 per slice)' in n for n in notes)
  # XPK runs --command with bash in each container, from the checkout.
  assert shlex.split(_flag(create, '--command')) == [
      'bash', 'launch/run_tpu.sh', *ARGS]


def test_slurm_two_gpu_nodes():
  commands, notes = _dry_run('slurm_gpu.sh', '--nodes', '2',
                             '--partition', 'gpu', '--', *ARGS)
  sbatch = _command(commands, 'sbatch')
  assert _flag(sbatch, '--nodes') == '2'
  assert _flag(sbatch, '--gpus-per-node') == '8'
  assert _flag(sbatch, '--ntasks-per-node') == '8'  # One process per GPU.
  assert _flag(sbatch, '--partition') == 'gpu'
  script = sbatch.index('launch/slurm_gpu.sbatch')
  assert sbatch[script + 1:] == ARGS
  srun = _command(commands, 'srun')
  assert _flag(srun, '--nodes') == '2'
  assert _flag(srun, '--ntasks-per-node') == '8'
  assert srun[srun.index('env'):] == [
      'env', 'FLAMINGO_JAX_DISTRIBUTED=1', 'python', '-m', *ARGS]
  assert any('16 JAX processes' in n for n in notes), notes


def _stub_tools(tmp_path) -> dict[str, str]:
  """gcloud, xpk, sbatch stubs that log their argv; gcloud answers ACTIVE."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  log = tmp_path / 'calls'
  for tool in ('gcloud', 'xpk', 'sbatch'):
    stub = bin_dir / tool
    stub.write_text(
        '#!/usr/bin/env bash\n'
        f'printf "%q " {tool} "$@" >> {shlex.quote(str(log))}\n'
        f'echo >> {shlex.quote(str(log))}\n'
        '[[ " $* " == *" describe "* ]] && echo ACTIVE\n'
        'exit 0\n')
    stub.chmod(0o755)
  return {'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'TMPDIR': str(tmp_path)}


@pytest.mark.parametrize('script,options', [
    ('tpu_pod.sh', ['--name', 'n', '--zone', 'z', '--type', 'v4-32',
                    '--create']),
    ('xpk.sh', ['--cluster', 'c', '--type', 'v5p-128', '--workload', 'w']),
    ('slurm_gpu.sh', ['--nodes', '2']),
])
def test_real_run_issues_the_dry_run_commands(tmp_path, script, options):
  env = _stub_tools(tmp_path)
  dry, _ = _dry_run(script, *options, '--', *ARGS, env=env)
  assert not (tmp_path / 'calls').exists()  # A dry run runs nothing.
  result = _run(script, *options, '--', *ARGS, env=env)
  assert result.returncode == 0, result.stderr
  called = [shlex.split(line) for line in
            (tmp_path / 'calls').read_text().splitlines()]
  tools = ('gcloud', 'xpk', 'sbatch')
  expected = [c for c in dry if c[0] in tools]
  # The wait loop asks for the state until it is ACTIVE (once, here).
  called = [c for c in called if 'describe' not in c]
  assert called == expected
  if script == 'tpu_pod.sh':  # The bundle was built where it was sent from.
    bundle = _command(dry, 'tar')[2]
    assert tarfile.is_tarfile(bundle)
    names = tarfile.open(bundle).getnames()
    assert './launch/run_tpu.sh' in names and './.git' not in names


@pytest.mark.parametrize('script,args,message', [
    ('tpu_pod.sh', ['--zone', 'z', 'm'], 'set --name'),
    ('tpu_pod.sh', ['--name', 'n', '--zone', 'z'], 'no module'),
    ('tpu_pod.sh', ['--name', 'n', '--zone', 'z', '--create', 'm'],
     '--create needs --type'),
    ('tpu_pod.sh', ['--name', 'n', '--zone', 'z', '--type', 'v9-8', 'm'],
     'unknown TPU generation'),
    ('tpu_pod.sh', ['--name', 'n', '--zone', 'z', '--bogus', 'm'],
     'unknown option --bogus'),
    ('xpk.sh', ['--type', 'v5p-128', 'm'], 'set --cluster'),
    ('xpk.sh', ['--cluster', 'c', '--type', 'v5p-128', '--num-slices', '0',
                'm'], '--num-slices must be >= 1'),
    ('slurm_gpu.sh', ['--nodes', 'two', 'm'], '--nodes must be >= 1'),
])
def test_bad_options_are_named(script, args, message):
  result = _run(script, '--dry-run', *args)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr
