"""Tests for xm_launch/launch.py without cloud access.

The plain parsing and command-building tests run everywhere; the ones that
need xmanager skip unless it is installed (.ci/xm_tests runs them in .venv-xm).
"""
import os
from pathlib import Path
import shlex
import stat
import subprocess
import sys

from absl import flags
import pytest

from xm_launch import launch

REPO = Path(__file__).resolve().parents[1]
JAX_PIN = next(line.split('==')[1].strip()
               for line in (REPO / 'requirements.txt').read_text().splitlines()
               if line.startswith('jax=='))


@pytest.fixture
def repo(tmp_path):
  """A minimal local checkout: one config file and a requirements.txt."""
  root = tmp_path / 'checkout'
  (root / 'configs').mkdir(parents=True)
  (root / 'configs' / 'energy_only.py').write_text('')
  (root / 'requirements.txt').write_text('numpy==2.0\njax==1.2.3  # pinned\n')
  return root


def _write_script(path, body):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text('#!/bin/sh\n' + body)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


# Records its argv NUL-separated, so quoting mistakes show up exactly.
_RECORD_ARGV = 'for a in "$@"; do printf "%s\\0" "$a"; done > "{out}"\n'


def _read_argv(path):
  return path.read_bytes().decode().split('\0')[:-1]


# --- parse_tpu --------------------------------------------------------------


@pytest.mark.parametrize(
    'spec, resource, quantity, accelerator_type, chips, hosts',
    [
        ('v2-8', 'tpu_v2', 8, 'v2-8', 4, 1),
        ('v3-32', 'tpu_v3', 32, 'v3-32', 16, 4),
        ('v4-8', 'tpu_v4', 8, 'v4-8', 4, 1),
        ('V4-32', 'tpu_v4', 32, 'v4-32', 16, 4),
        ('v4:2x2x2', 'tpu_v4', '2x2x2', 'v4-16', 8, 2),
        ('v5e-16', 'tpu_v5e', 16, 'v5litepod-16', 16, 4),
        ('v5litepod-8', 'tpu_v5e', 8, 'v5litepod-8', 8, 1),
        ('v5e-1', 'tpu_v5e', 1, 'v5litepod-1', 1, 1),
        ('v5e:4x4', 'tpu_v5e', '4x4', 'v5litepod-16', 16, 4),
        ('v5p-32', 'tpu_v5p', 32, 'v5p-32', 16, 4),
        ('v5p:2x2x4', 'tpu_v5p', '2x2x4', 'v5p-32', 16, 4),
        ('v6e-8', 'tpu_v6e', 8, 'v6e-8', 8, 1),
        ('v6e:2x4', 'tpu_v6e', '2x4', 'v6e-8', 8, 1),
        ('v6e-64', 'tpu_v6e', 64, 'v6e-64', 64, 16),
        ('v5e:2x2', 'tpu_v5e', '2x2', 'v5litepod-4', 4, 1),
        ('v4:2x2x1', 'tpu_v4', '2x2x1', 'v4-8', 4, 1),
    ])
def test_parse_tpu(spec, resource, quantity, accelerator_type, chips, hosts):
  tpu = launch.parse_tpu(spec)
  assert (tpu.resource, tpu.quantity, tpu.accelerator_type, tpu.chips,
          tpu.num_hosts) == (resource, quantity, accelerator_type, chips,
                             hosts)
  assert launch.requirements_kwargs(tpu) == {resource: quantity}


@pytest.mark.parametrize(
    'spec, fragment',
    [
        ('', '--tpu is required'),
        ('v4', "--tpu='v4': missing chip count"),
        ('v4-', "--tpu='v4-': missing chip count"),
        ('v9-8', "--tpu='v9-8': unknown TPU type 'v9'"),
        ('tpu_v4=8', 'unknown TPU type'),
        ('v4-x', "count 'x' is not a positive integer"),
        ('v4-0', 'is not a positive integer'),
        ('v4-6', 'multiple of 8 TensorCores (4 chips), got 6'),
        ('v5e-2', '1, 4 or a multiple of 8 chips, got 2'),
        ('v4:2x2', 'topology must look like NxNxN'),
        ('v5e:4x4x1', 'topology must look like NxN'),
        ('v5e:4x0', 'topology must look like NxN'),
        ('v4:1x1x1', 'multiple of 8 TensorCores (4 chips), got 2'),
        ('v5e:1x2', '1, 4 or a multiple of 8 chips, got 2'),
    ])
def test_parse_tpu_rejects(spec, fragment):
  with pytest.raises(launch.LaunchError, match='--tpu') as info:
    launch.parse_tpu(spec)
  assert fragment in str(info.value)


# --- flag checks ------------------------------------------------------------


def test_parse_overrides():
  assert launch.parse_overrides(
      ['num_train_steps=10', 'model.dtype=float32', 'data.path=a=b', 'x=']) == [
          '--config.num_train_steps=10', '--config.model.dtype=float32',
          '--config.data.path=a=b', '--config.x=']
  assert launch.parse_overrides([]) == []


@pytest.mark.parametrize('item', ['num_train_steps', '=3', 'model..dtype=1',
                                  '1abc=2', 'model.dtype-x=1'])
def test_parse_overrides_rejects(item):
  with pytest.raises(launch.LaunchError, match='--config_overrides'):
    launch.parse_overrides([item])


def test_check_config(repo):
  assert launch.check_config('configs/energy_only.py', str(repo))
  assert launch.check_config('configs/energy_only.py:smoke', str(repo))
  cases = {
      '': '--config is required',
      'configs/missing.py': "--config='configs/missing.py': file",
      str(repo / 'configs/energy_only.py'): 'relative to the repository root',
      'configs': 'expected a .py config file',
  }
  for config, fragment in cases.items():
    with pytest.raises(launch.LaunchError) as info:
      launch.check_config(config, str(repo))
    assert fragment in str(info.value)


@pytest.mark.parametrize('workdir, fragment', [
    ('', '--workdir is required'),
    (None, '--workdir is required'),
    ('/tmp/run', "--workdir='/tmp/run': must be a gs://"),
    ('gs://', 'must be a gs://'),
    ('gs://a/run', 'must be a gs://'),
    ('s3://bucket/run', 'must be a gs://'),
])
def test_check_workdir_rejects(workdir, fragment):
  with pytest.raises(launch.LaunchError) as info:
    launch.check_workdir(workdir)
  assert fragment in str(info.value)


def test_check_workdir_accepts():
  for workdir in ('gs://my-bucket', 'gs://my-bucket/runs/exp_1'):
    assert launch.check_workdir(workdir) == workdir


def test_check_tpu_name():
  assert launch.check_tpu_name('my-tpu-1') == 'my-tpu-1'
  for name, fragment in [('', '--tpu_name is required'),
                         ('My_TPU', "--tpu_name='My_TPU'"),
                         ('1tpu', "--tpu_name='1tpu'"),
                         ('tpu-', "--tpu_name='tpu-'")]:
    with pytest.raises(launch.LaunchError) as info:
      launch.check_tpu_name(name)
    assert fragment in str(info.value)


def test_jax_tpu_requirement(repo, tmp_path):
  assert launch.jax_tpu_requirement(str(repo / 'requirements.txt')) == (
      'jax[tpu]==1.2.3')
  # The project's own pin.
  assert launch.jax_tpu_requirement(str(REPO / 'requirements.txt')) == (
      f'jax[tpu]=={JAX_PIN}')
  no_jax = tmp_path / 'req.txt'
  no_jax.write_text('jaxlib==1.0\n')
  with pytest.raises(launch.LaunchError, match='no "jax==VERSION"'):
    launch.jax_tpu_requirement(str(no_jax))
  with pytest.raises(launch.LaunchError, match='cannot read'):
    launch.jax_tpu_requirement(str(tmp_path / 'absent.txt'))


# --- host and gcloud commands -----------------------------------------------

_OVERRIDES = ['num_train_steps=7', "model.name=it's a test", 'data.x=$HOME;ls']
_EXPECTED_TRAIN_ARGV = [
    '-m', 'pipeline.main', '--config=configs/energy_only.py:smoke',
    '--workdir=gs://bkt/run 1', '--config.num_train_steps=7',
    "--config.model.name=it's a test", '--config.data.x=$HOME;ls']


def _fake_checkout(home, name):
  """A checkout whose .venv tools record their argv instead of running."""
  checkout = home / name
  _write_script(checkout / '.venv/bin/python',
                _RECORD_ARGV.format(out=home / 'python.argv'))
  _write_script(checkout / '.venv/bin/pip',
                'for a in "$@"; do printf "%s\\0" "$a"; done >> '
                f'"{home / "pip.argv"}"\n')
  return checkout


def test_host_command_runs_trainer_with_exact_args(tmp_path):
  home = tmp_path / 'home'
  _fake_checkout(home, 'my checkout')
  command = launch.build_host_command(
      'configs/energy_only.py:smoke', 'gs://bkt/run 1', _OVERRIDES,
      remote_dir='my checkout', jax_requirement='jax[tpu]==0.10.2')
  assert '|| python3 -m venv .venv;' in command
  subprocess.run(['bash', '-c', command], cwd=home, check=True)
  assert _read_argv(home / 'python.argv') == _EXPECTED_TRAIN_ARGV
  assert _read_argv(home / 'pip.argv') == [
      'install', '--quiet', '--upgrade', 'pip',
      'install', '--quiet', '-r', 'requirements.txt', 'jax[tpu]==0.10.2']


def test_host_command_without_install_and_failure_stops(tmp_path):
  home = tmp_path / 'home'
  _fake_checkout(home, 'pi0-energy')
  command = launch.build_host_command(
      'configs/energy_only.py:smoke', 'gs://bkt/run 1', _OVERRIDES,
      install=False)
  assert 'pip install' not in command
  subprocess.run(['sh', '-c', command], cwd=home, check=True)
  assert _read_argv(home / 'python.argv') == _EXPECTED_TRAIN_ARGV
  assert not (home / 'pip.argv').exists()
  # A missing checkout stops the chain before the trainer.
  result = subprocess.run(
      ['sh', '-c', launch.build_host_command('c.py', 'gs://bkt/r',
                                             remote_dir='absent')],
      cwd=home, capture_output=True)
  assert result.returncode != 0


def test_host_command_clones_and_checks_out_ref(tmp_path):
  # A local repository stands in for the git server.
  origin = tmp_path / 'origin'
  env = {**os.environ, 'GIT_AUTHOR_NAME': 't', 'GIT_AUTHOR_EMAIL': 't@t',
         'GIT_COMMITTER_NAME': 't', 'GIT_COMMITTER_EMAIL': 't@t'}
  git = lambda *a, cwd=origin: subprocess.run(  # pylint: disable=g-long-lambda
      ['git', *a], cwd=cwd, env=env, check=True, capture_output=True)
  origin.mkdir()
  git('init', '--quiet', '-b', 'main')
  home = tmp_path / 'home'
  home.mkdir()
  _write_script(origin / '.venv/bin/python',
                _RECORD_ARGV.format(out=home / 'python.argv'))
  (origin / 'marker').write_text('v1')
  git('add', '-A')
  git('commit', '--quiet', '-m', 'v1')
  git('tag', 'v1')
  (origin / 'marker').write_text('v2')
  git('commit', '--quiet', '-am', 'v2')

  def host(ref):
    command = launch.build_host_command(
        'configs/energy_only.py:smoke', 'gs://bkt/run 1', _OVERRIDES,
        install=False, git_url=str(origin), git_ref=ref)
    subprocess.run(['bash', '-c', command], cwd=home, env=env, check=True,
                   capture_output=True)
    return (home / 'pi0-energy' / 'marker').read_text()

  assert host('v1') == 'v1'            # Fresh clone, then the tag.
  assert host('main') == 'v2'          # Existing clone is updated.
  assert _read_argv(home / 'python.argv') == _EXPECTED_TRAIN_ARGV


def test_build_gcloud_command():
  argv = launch.build_gcloud_command(
      'my-tpu', 'cd x && echo "a b"', zone='us-central2-b', project='proj')
  assert argv == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu',
                  '--zone=us-central2-b', '--project=proj', '--worker=all',
                  '--command=cd x && echo "a b"']
  assert launch.build_gcloud_command('t', 'true', gcloud='/bin/gc') == [
      '/bin/gc', 'compute', 'tpus', 'tpu-vm', 'ssh', 't', '--worker=all',
      '--command=true']


# --- LaunchSpec and flags ---------------------------------------------------


def test_make_launch_spec(repo):
  spec = launch.make_launch_spec(
      config='configs/energy_only.py', workdir='gs://bkt/run', tpu='v4-16',
      tpu_name='my-tpu', zone='z', overrides=['seed=3'], repo_dir=str(repo),
      remote_python='python3.11')
  assert spec.jax_requirement == 'jax[tpu]==1.2.3'
  assert '|| python3.11 -m venv .venv;' in spec.host_command
  assert spec.tpu.accelerator_type == 'v4-16'
  argv = spec.gcloud_argv
  assert argv[:7] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu',
                      '--zone=z']
  assert argv[-1] == '--command=' + spec.host_command
  assert spec.host_command.endswith(
      'exec .venv/bin/python -m pipeline.main --config=configs/energy_only.py '
      '--workdir=gs://bkt/run --config.seed=3')
  assert "'jax[tpu]==1.2.3'" in spec.host_command


@pytest.mark.parametrize('kwargs, fragment', [
    (dict(tpu='v4'), "--tpu='v4'"),
    (dict(tpu_name=''), '--tpu_name is required'),
    (dict(workdir='/local/dir'), '--workdir='),
    (dict(config='configs/nope.py'), '--config='),
    (dict(overrides=['bad']), '--config_overrides='),
    (dict(executor='k8s'), "--executor='k8s'"),
    (dict(executor='vertex'), "--executor=vertex with --tpu='v4-8'"),
    (dict(executor='vertex', tpu='v3-32'), 'v2-8, v3-8'),
])
def test_make_launch_spec_rejects(repo, kwargs, fragment):
  args = dict(config='configs/energy_only.py', workdir='gs://bkt/run',
              tpu='v4-8', tpu_name='my-tpu', repo_dir=str(repo))
  args.update(kwargs)
  with pytest.raises(launch.LaunchError) as info:
    launch.make_launch_spec(**args)
  assert fragment in str(info.value)


def test_vertex_spec_uses_core_count(repo):
  # Vertex reads the requirement as accelerator_count: '2x2' must become 8.
  spec = launch.make_launch_spec(
      config='configs/energy_only.py', workdir='gs://bkt/run', tpu='v2:2x2',
      executor='vertex', repo_dir=str(repo))
  assert launch.requirements_kwargs(spec.tpu) == {'tpu_v2': 8}
  assert launch.vertex_docker_instructions(str(repo), 'jax[tpu]==1.2.3') == [
      'ENV LANG=C.UTF-8',
      'COPY checkout/requirements.txt /pi0-energy/requirements.txt',
      'RUN python -m pip install --no-cache-dir -r '
      "/pi0-energy/requirements.txt 'jax[tpu]==1.2.3'",
      'COPY checkout/ /pi0-energy',
      'WORKDIR /pi0-energy',
  ]


def test_flags_to_spec(repo):
  fv = flags.FlagValues()
  launch.define_flags(fv)
  fv(['launch', '--tpu=v5e-16', '--tpu_name=pod', '--zone=z', '--project=p',
      '--workdir=gs://bkt/r', f'--repo_dir={repo}', '--noinstall',
      '--remote_python=python3.11',
      '--config_overrides=seed=1', '--config_overrides=model.dtype=float32'])
  spec = launch.spec_from_flags(fv)
  assert spec.config == 'configs/energy_only.py'
  assert spec.tpu.resource == 'tpu_v5e' and spec.tpu.quantity == 16
  assert spec.overrides == ('seed=1', 'model.dtype=float32')
  assert not spec.install
  assert spec.remote_python == 'python3.11'
  assert spec.gcloud_argv[-1] == (
      '--command=cd pi0-energy && exec .venv/bin/python -m pipeline.main '
      '--config=configs/energy_only.py --workdir=gs://bkt/r '
      '--config.seed=1 --config.model.dtype=float32')


def _run_launcher(args, *, env=None, python=sys.executable):
  return subprocess.run(
      [python, '-m', 'xm_launch.launch', *args], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=120)


def test_dry_run_prints_command(repo):
  result = _run_launcher([
      '--dry_run', '--tpu=v4-32', '--tpu_name=my-tpu', '--zone=us-central2-b',
      '--workdir=gs://bkt/run', f'--repo_dir={repo}',
      '--config_overrides=seed=1'])
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[1] == ('tpu: v4-32 (16 chips, 4 host(s)); '
                      "xm.JobRequirements(tpu_v4=32)")
  printed = shlex.split(lines[2].removeprefix('command: '))
  assert printed == launch.make_launch_spec(
      config='configs/energy_only.py', workdir='gs://bkt/run', tpu='v4-32',
      tpu_name='my-tpu', zone='us-central2-b', overrides=['seed=1'],
      repo_dir=str(repo)).gcloud_argv


@pytest.mark.parametrize('args, fragment', [
    (['--tpu=v4'], "error: --tpu='v4': missing chip count"),
    (['--tpu=v4-8', '--config=configs/nope.py'], "error: --config="),
    (['--tpu=v4-8', '--workdir='], 'error: --workdir is required'),
])
def test_bad_flags_exit_with_flag_name(repo, args, fragment):
  base = {'--tpu_name': 'my-tpu', '--workdir': 'gs://bkt/run',
          '--repo_dir': str(repo)}
  for arg in args:
    base.pop(arg.split('=')[0], None)
  result = _run_launcher(
      ['--dry_run', *args, *(f'{k}={v}' for k, v in base.items())])
  assert result.returncode != 0
  assert fragment in result.stderr
  assert '--base_image' not in result.stderr  # Message, not the flag list.


# --- with xmanager (runs in .venv-xm via .ci/xm_tests) ----------------------


@pytest.fixture
def xm_modules():
  xmanager = pytest.importorskip('xmanager')
  del xmanager
  from xmanager import xm  # pylint: disable=g-import-not-at-top
  from xmanager import xm_local  # pylint: disable=g-import-not-at-top
  return xm, xm_local


@pytest.mark.parametrize('spec, resource, count, topology', [
    ('v4-8', 'TPU_V4', 8, None),
    ('v5p-32', 'TPU_V5P', 32, None),
    ('v4:2x2x2', 'TPU_V4', 8, '2x2x2'),
    ('v5e:4x4', 'TPU_V5E', 16, '4x4'),
    ('v6e-8', 'TPU_V6E', 8, None),
])
def test_build_requirements(xm_modules, spec, resource, count, topology):
  xm, _ = xm_modules
  requirements = launch.build_requirements(spec)
  assert requirements.accelerator == xm.ResourceType[resource]
  assert requirements.task_requirements[xm.ResourceType[resource]] == count
  # xmanager records a plain count as a one-dimensional topology.
  assert requirements.topology == xm.Topology(topology or str(count))


def test_local_gcloud_job(xm_modules, repo):
  xm, xm_local = xm_modules
  spec = launch.make_launch_spec(
      config='configs/energy_only.py', workdir='gs://bkt/run', tpu='v4-16',
      tpu_name='my-tpu', zone='z', overrides=_OVERRIDES, repo_dir=str(repo),
      gcloud='/opt/gcloud')
  packageable = launch.make_packageable(spec)
  assert isinstance(packageable.executor_spec, xm_local.Local.Spec)
  assert isinstance(packageable.executable_spec, xm.Binary)
  assert packageable.executable_spec.path == '/opt/gcloud'
  # What xm_local hands to the shell, split back into argv.
  tokens = packageable.args.to_list()
  assert shlex.split(' '.join(tokens)) == spec.gcloud_argv[1:]

  job = launch.make_job(spec, object())
  assert isinstance(job, xm.Job)
  assert isinstance(job.executor, xm_local.Local)
  assert job.executor.requirements.accelerator == xm.ResourceType.TPU_V4
  assert job.executor.requirements.task_requirements[
      xm.ResourceType.TPU_V4] == 16


def test_vertex_job(xm_modules, repo):
  xm, xm_local = xm_modules
  from xmanager.cloud import vertex  # pylint: disable=g-import-not-at-top
  spec = launch.make_launch_spec(
      config='configs/energy_only.py', workdir='gs://bkt/run', tpu='v3-8',
      executor='vertex', overrides=['seed=2'], repo_dir=str(repo))
  packageable = launch.make_packageable(spec)
  container = packageable.executable_spec
  assert isinstance(packageable.executor_spec, xm_local.Vertex.Spec)
  assert isinstance(container, xm.PythonContainer)
  assert container.entrypoint == xm.ModuleName('pipeline.main')
  assert container.path == str(repo)
  assert container.docker_instructions == launch.vertex_docker_instructions(
      str(repo), 'jax[tpu]==1.2.3')
  assert packageable.args.to_list(lambda v: v) == [
      '--config=configs/energy_only.py', '--workdir=gs://bkt/run',
      '--config.seed=2']
  job = launch.make_job(spec, object())
  assert isinstance(job.executor, xm_local.Vertex)
  machine = vertex.get_machine_spec(job)
  assert machine['machine_type'] == 'cloud-tpu'
  assert machine['accelerator_count'] == 8
  assert machine['accelerator_type'].name == 'TPU_V3'


def test_vertex_rejects_v4_like_xmanager(xm_modules):
  # The launcher's v2/v3 restriction mirrors xmanager's own Vertex mapping.
  _, xm_local = xm_modules
  from xmanager import xm  # pylint: disable=g-import-not-at-top
  from xmanager.cloud import vertex  # pylint: disable=g-import-not-at-top
  job = xm.Job(executable=object(), executor=xm_local.Vertex(
      requirements=launch.build_requirements('v4-8')))
  with pytest.raises(KeyError):
    vertex.get_machine_spec(job)


def test_launch_runs_gcloud_through_xmanager(xm_modules, repo, tmp_path):
  """End to end with xm_local and a stand-in gcloud that records its argv."""
  del xm_modules
  fake = tmp_path / 'bin' / 'gcloud'
  _write_script(fake, _RECORD_ARGV.format(out=tmp_path / 'gcloud.argv'))
  home = tmp_path / 'home'  # xm_local keeps its sqlite database under ~.
  home.mkdir()
  env = {**os.environ, 'HOME': str(home),
         'PATH': f'{fake.parent}{os.pathsep}{os.environ["PATH"]}'}
  args = ['--tpu=v5e-16', '--tpu_name=my-tpu', '--zone=z',
          '--workdir=gs://bkt/run', f'--repo_dir={repo}',
          *(f'--config_overrides={o}' for o in _OVERRIDES)]
  result = _run_launcher(args, env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  expected = launch.make_launch_spec(
      config='configs/energy_only.py', workdir='gs://bkt/run', tpu='v5e-16',
      tpu_name='my-tpu', zone='z', overrides=_OVERRIDES,
      repo_dir=str(repo)).gcloud_argv
  assert _read_argv(tmp_path / 'gcloud.argv') == expected[1:]


def test_failed_gcloud_fails_the_launch(xm_modules, repo, tmp_path):
  del xm_modules
  fake = tmp_path / 'bin' / 'gcloud'
  _write_script(fake, 'exit 3\n')
  home = tmp_path / 'home'
  home.mkdir()
  env = {**os.environ, 'HOME': str(home)}
  result = _run_launcher(
      ['--tpu=v4-8', '--tpu_name=my-tpu', '--workdir=gs://bkt/run',
       f'--repo_dir={repo}', f'--gcloud={fake}'], env=env)
  assert result.returncode != 0
  assert 'error: launch failed' in result.stderr
  assert 'non-zero code: 3' in result.stderr
