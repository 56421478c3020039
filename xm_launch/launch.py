r"""Launches pipeline.main on a Cloud TPU VM slice through XManager.

Default executor (`local_gcloud`): an `xm_local.Local` job on this machine
runs `gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...`, so every
host of an existing TPU VM slice installs the project requirements and starts
`python -m pipeline.main`. `jax.distributed.initialize()` inside pipeline.main
discovers the pod topology on its own, so all hosts run the same command.

`vertex` executor: a Vertex AI custom job built from this checkout. The PyPI
xmanager maps only TPU v2/v3 to Vertex, so it is limited to v2-8 and v3-8.

Runs in its own virtual environment (xm_launch/requirements.txt), because
xmanager pins an older protobuf than the training stack:

  .venv-xm/bin/python -m xm_launch.launch --tpu=v4-32 --tpu_name=my-tpu \
      --zone=us-central2-b --workdir=gs://bucket/runs/exp1 \
      --config=configs/energy_only.py --config_overrides=num_train_steps=1000 \
      --dry_run

The parsing and command building below are plain functions that need neither
xmanager nor cloud access; only `build_requirements`, `make_packageable`,
`make_job` and `main` import xmanager.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import shutil
from typing import Any, Sequence, Union

from absl import app
from absl import flags

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXECUTORS = ('local_gcloud', 'vertex')
DEFAULT_CONFIG = 'configs/energy_only.py'
DEFAULT_REMOTE_DIR = 'pi0-energy'
DEFAULT_BASE_IMAGE = 'python:3.11-slim'
# Where the vertex image keeps the project.
_CONTAINER_DIR = '/pi0-energy'


class LaunchError(ValueError):
  """A launch flag has an invalid value; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class _TpuFamily:
  resource: str          # xm.JobRequirements keyword, e.g. 'tpu_v4'.
  gcloud_prefix: str     # Cloud TPU accelerator-type prefix, e.g. 'v5litepod'.
  cores_per_chip: int    # The number in 'v4-8' counts TensorCores.
  topology_dims: int     # 2D torus (v2/v3/v5e/v6e) or 3D (v4/v5p).


_TPU_FAMILIES = {
    'v2': _TpuFamily('tpu_v2', 'v2', 2, 2),
    'v3': _TpuFamily('tpu_v3', 'v3', 2, 2),
    'v4': _TpuFamily('tpu_v4', 'v4', 2, 3),
    'v5e': _TpuFamily('tpu_v5e', 'v5litepod', 1, 2),
    'v5p': _TpuFamily('tpu_v5p', 'v5p', 2, 3),
    'v6e': _TpuFamily('tpu_v6e', 'v6e', 1, 2),
}
# Cloud TPU's own names for v5e.
_TPU_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e'}
# Hosts of multi-host slices carry 4 chips on every TPU generation above.
_CHIPS_PER_HOST = 4
_TPU_FORMS = ("'<type>-<count>' (v4-8, v5e-16, v5litepod-16, v5p-32, v6e-8) "
              "or '<type>:<topology>' (v4:2x2x2, v5e:4x4)")
_VERTEX_TPUS = ('v2', 'v3')
_OVERRIDE_KEY = re.compile(r'[A-Za-z_]\w*(\.[A-Za-z_]\w*)*')
_GCS_PATH = re.compile(r'gs://[a-z0-9][a-z0-9._-]+[a-z0-9](/.*)?')
_TPU_NAME = re.compile(r'[a-z]([-a-z0-9]*[a-z0-9])?')


@dataclasses.dataclass(frozen=True)
class TpuSpec:
  """A parsed --tpu value.

  Attributes:
    version: Canonical generation, e.g. 'v5e'.
    resource: xm.JobRequirements keyword, e.g. 'tpu_v5e'.
    quantity: Count as written in the accelerator type (int, 'v4-8' -> 8) or a
      topology string ('2x2x2'); passed to xm.JobRequirements unchanged.
    accelerator_type: Cloud TPU accelerator type, e.g. 'v5litepod-16'.
    chips: Number of TPU chips in the slice.
    num_hosts: Number of TPU VM hosts in the slice.
  """
  version: str
  resource: str
  quantity: Union[int, str]
  accelerator_type: str
  chips: int
  num_hosts: int


def parse_tpu(spec: str) -> TpuSpec:
  """Parses '<type>-<count>' or '<type>:<topology>' into a TpuSpec.

  Args:
    spec: e.g. 'v4-8', 'v5e-16', 'v5litepod-16', 'v5p-32', 'v4:2x2x2',
      'v5e:4x4'.

  Returns:
    The parsed TpuSpec.

  Raises:
    LaunchError: unknown TPU type, missing or invalid count/topology.
  """
  text = (spec or '').strip().lower()
  if not text:
    raise LaunchError(f'--tpu is required: {_TPU_FORMS}.')
  if ':' in text:
    name, _, size = text.partition(':')
  elif '-' in text:
    name, _, size = text.rpartition('-')
  else:
    name, size = text, ''
  version = _TPU_ALIASES.get(name, name)
  family = _TPU_FAMILIES.get(version)
  if family is None:
    raise LaunchError(
        f'--tpu={spec!r}: unknown TPU type {name!r}; known types: '
        f'{", ".join(_TPU_FAMILIES)} (aliases: {", ".join(_TPU_ALIASES)}).')
  if not size:
    raise LaunchError(
        f'--tpu={spec!r}: missing chip count or topology; '
        f'expected {_TPU_FORMS}.')

  if ':' in text:
    dims = size.split('x')
    if (len(dims) != family.topology_dims
        or not all(d.isdigit() and int(d) > 0 for d in dims)):
      shape = 'x'.join(['N'] * family.topology_dims)
      raise LaunchError(
          f'--tpu={spec!r}: TPU {version} topology must look like {shape} '
          'with positive integers.')
    count = math.prod(int(d) for d in dims) * family.cores_per_chip
    quantity: Union[int, str] = size
  else:
    if not size.isdigit() or int(size) <= 0:
      raise LaunchError(
          f'--tpu={spec!r}: count {size!r} is not a positive integer; '
          f'expected {_TPU_FORMS}.')
    count = int(size)
    quantity = count
  # Multi-core chips come in hosts of 8 cores; v5e/v6e hosts hold 1, 4 or 8.
  if family.cores_per_chip > 1 and count % 8:
    raise LaunchError(
        f'--tpu={spec!r}: TPU {version} slices have a multiple of 8 '
        f'TensorCores (4 chips), got {count} (v4-8, v4-16, ...).')
  if family.cores_per_chip == 1 and count not in (1, 4) and count % 8:
    raise LaunchError(
        f'--tpu={spec!r}: TPU {version} slices have 1, 4 or a multiple of 8 '
        f'chips, got {count}.')
  chips = count // family.cores_per_chip
  # Single-host v5e/v6e machines hold up to 8 chips; everything else 4/host.
  if family.cores_per_chip == 1 and chips <= 8:
    num_hosts = 1
  else:
    num_hosts = max(1, chips // _CHIPS_PER_HOST)
  return TpuSpec(
      version=version,
      resource=family.resource,
      quantity=quantity,
      accelerator_type=f'{family.gcloud_prefix}-{count}',
      chips=chips,
      num_hosts=num_hosts)


def requirements_kwargs(tpu: TpuSpec) -> dict[str, Union[int, str]]:
  """The keyword arguments for xm.JobRequirements, e.g. {'tpu_v4': 8}."""
  return {tpu.resource: tpu.quantity}


def parse_overrides(overrides: Sequence[str]) -> list[str]:
  """Turns KEY=VALUE items into pipeline.main's --config.KEY=VALUE flags."""
  result = []
  for item in overrides or ():
    key, sep, value = item.partition('=')
    key = key.strip()
    if not sep or not _OVERRIDE_KEY.fullmatch(key):
      raise LaunchError(
          f'--config_overrides={item!r}: expected KEY=VALUE with a dotted '
          'config key, e.g. model.dtype=float32.')
    result.append(f'--config.{key}={value}')
  return result


def check_config(config: str, repo_dir: str = REPO_DIR) -> str:
  """Checks that --config names a .py file of the checkout (':arg' allowed)."""
  if not config:
    raise LaunchError(f'--config is required, e.g. {DEFAULT_CONFIG}.')
  path, _, _ = config.partition(':')
  if os.path.isabs(path):
    raise LaunchError(
        f'--config={config!r}: use a path relative to the repository root; '
        'the hosts resolve it inside their own checkout.')
  if not path.endswith('.py'):
    raise LaunchError(f'--config={config!r}: expected a .py config file.')
  if not os.path.isfile(os.path.join(repo_dir, path)):
    raise LaunchError(
        f'--config={config!r}: file {path!r} not found under {repo_dir}.')
  return config


def check_workdir(workdir: str) -> str:
  """Checks that --workdir is a gs:// path, which every host can reach."""
  if not workdir:
    raise LaunchError(
        '--workdir is required: a gs:// path shared by all TPU hosts, '
        'e.g. gs://my-bucket/pi0e/run1.')
  if not _GCS_PATH.fullmatch(workdir):
    raise LaunchError(
        f'--workdir={workdir!r}: must be a gs://BUCKET/PATH location (bucket '
        'name of 3+ lowercase characters); every host of a multi-host slice '
        'writes checkpoints there.')
  return workdir


def check_tpu_name(tpu_name: str) -> str:
  """Checks --tpu_name against Cloud TPU's naming rules."""
  if not tpu_name:
    raise LaunchError(
        '--tpu_name is required for --executor=local_gcloud: the name of an '
        'existing TPU VM (gcloud compute tpus tpu-vm list).')
  if not _TPU_NAME.fullmatch(tpu_name):
    raise LaunchError(
        f'--tpu_name={tpu_name!r}: must be lowercase letters, digits and '
        'hyphens, starting with a letter.')
  return tpu_name


def jax_tpu_requirement(requirements_path: str) -> str:
  """Returns 'jax[tpu]==X' for the jax version pinned in requirements.txt."""
  try:
    with open(requirements_path) as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise LaunchError(
        f'cannot read {requirements_path} for the jax version: {e}') from e
  for line in lines:
    match = re.fullmatch(r'\s*jax\s*==\s*([\w.]+)\s*(#.*)?', line)
    if match:
      return f'jax[tpu]=={match.group(1)}'
  raise LaunchError(f'{requirements_path}: no "jax==VERSION" line.')


def pipeline_args(config: str, workdir: str,
                  overrides: Sequence[str] = ()) -> list[str]:
  """pipeline.main's command-line arguments."""
  return [f'--config={config}', f'--workdir={workdir}',
          *parse_overrides(overrides)]


def build_host_command(config: str,
                       workdir: str,
                       overrides: Sequence[str] = (),
                       *,
                       remote_dir: str = DEFAULT_REMOTE_DIR,
                       install: bool = True,
                       jax_requirement: str = 'jax[tpu]',
                       git_url: str = '',
                       git_ref: str = 'main',
                       python: str = 'python3') -> str:
  """The shell command every TPU host runs.

  Args:
    config: pipeline.main --config value (relative to the checkout).
    workdir: pipeline.main --workdir value.
    overrides: KEY=VALUE config overrides.
    remote_dir: Checkout directory on the hosts, relative to the home dir.
    install: Create remote_dir/.venv if needed and install requirements.txt
      plus the TPU jax extra into it.
    jax_requirement: The jax TPU requirement, e.g. 'jax[tpu]==0.10.2'.
    git_url: If set, clone it into remote_dir when absent and check out
      git_ref; otherwise remote_dir must already hold the checkout.
    git_ref: Branch, tag or commit to run.
    python: Interpreter that creates the venv (the pins need Python >= 3.11).

  Returns:
    One command line, steps joined with '&&' so the first failure stops it.
  """
  q = shlex.quote
  steps = []
  if git_url:
    steps += [
        f'{{ [ -d {q(remote_dir)}/.git ] || '
        f'git clone --quiet {q(git_url)} {q(remote_dir)}; }}',
        f'cd {q(remote_dir)}',
        f'git fetch --quiet origin {q(git_ref)}',
        'git checkout --quiet --detach FETCH_HEAD',
    ]
  else:
    steps.append(f'cd {q(remote_dir)}')
  if install:
    steps += [
        f'{{ [ -x .venv/bin/python ] || {q(python)} -m venv .venv; }}',
        '.venv/bin/pip install --quiet --upgrade pip',
        ('.venv/bin/pip install --quiet -r requirements.txt '
         f'{q(jax_requirement)}'),
    ]
  # exec: the ssh session's exit status is the trainer's.
  steps.append(' '.join(
      ['exec', '.venv/bin/python', '-m', 'pipeline.main']
      + [q(a) for a in pipeline_args(config, workdir, overrides)]))
  return ' && '.join(steps)


def build_gcloud_command(tpu_name: str,
                         host_command: str,
                         *,
                         zone: str = '',
                         project: str = '',
                         gcloud: str = 'gcloud') -> list[str]:
  """argv of the gcloud call that runs host_command on every host."""
  argv = [gcloud, 'compute', 'tpus', 'tpu-vm', 'ssh', tpu_name]
  if zone:
    argv.append(f'--zone={zone}')
  if project:
    argv.append(f'--project={project}')
  argv += ['--worker=all', f'--command={host_command}']
  return argv


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
  """Validated launch settings; see define_flags for the meaning of each."""
  config: str
  workdir: str
  tpu: TpuSpec
  executor: str = 'local_gcloud'
  tpu_name: str = ''
  zone: str = ''
  project: str = ''
  overrides: tuple[str, ...] = ()
  remote_dir: str = DEFAULT_REMOTE_DIR
  install: bool = True
  git_url: str = ''
  git_ref: str = 'main'
  remote_python: str = 'python3'
  gcloud: str = 'gcloud'
  jax_requirement: str = 'jax[tpu]'
  base_image: str = DEFAULT_BASE_IMAGE
  repo_dir: str = REPO_DIR
  title: str = ''

  @property
  def host_command(self) -> str:
    return build_host_command(
        self.config, self.workdir, self.overrides,
        remote_dir=self.remote_dir, install=self.install,
        jax_requirement=self.jax_requirement, git_url=self.git_url,
        git_ref=self.git_ref, python=self.remote_python)

  @property
  def gcloud_argv(self) -> list[str]:
    return build_gcloud_command(
        self.tpu_name, self.host_command, zone=self.zone,
        project=self.project, gcloud=self.gcloud)


def make_launch_spec(*,
                     config: str,
                     workdir: str,
                     tpu: str,
                     executor: str = 'local_gcloud',
                     tpu_name: str = '',
                     zone: str = '',
                     project: str = '',
                     overrides: Sequence[str] = (),
                     repo_dir: str = REPO_DIR,
                     **kwargs: Any) -> LaunchSpec:
  """Validates the launch flags and returns a LaunchSpec.

  Args:
    config: --config.
    workdir: --workdir.
    tpu: --tpu.
    executor: --executor.
    tpu_name: --tpu_name (required for local_gcloud).
    zone: --zone.
    project: --project.
    overrides: --config_overrides items.
    repo_dir: Local checkout used to check --config and read the jax pin.
    **kwargs: Remaining LaunchSpec fields (remote_dir, install, git_url, ...).

  Returns:
    The LaunchSpec.

  Raises:
    LaunchError: naming the offending flag.
  """
  if executor not in EXECUTORS:
    raise LaunchError(
        f'--executor={executor!r}: expected one of {", ".join(EXECUTORS)}.')
  tpu_spec = parse_tpu(tpu)
  check_workdir(workdir)
  check_config(config, repo_dir)
  parse_overrides(overrides)
  if executor == 'local_gcloud':
    check_tpu_name(tpu_name)
  elif (tpu_spec.version not in _VERTEX_TPUS
        or tpu_spec.accelerator_type not in ('v2-8', 'v3-8')):
    raise LaunchError(
        f'--executor=vertex with --tpu={tpu!r}: xmanager maps only TPU v2/v3 '
        'to Vertex AI (v2-8, v3-8); use --executor=local_gcloud for '
        'TPU VM slices of v4 and newer.')
  else:
    # Vertex reads the count as accelerator_count, so use the '-8' form.
    tpu_spec = parse_tpu(tpu_spec.accelerator_type)
  if 'jax_requirement' not in kwargs:
    kwargs['jax_requirement'] = jax_tpu_requirement(
        os.path.join(repo_dir, 'requirements.txt'))
  return LaunchSpec(
      config=config, workdir=workdir, tpu=tpu_spec, executor=executor,
      tpu_name=tpu_name, zone=zone, project=project,
      overrides=tuple(overrides or ()), repo_dir=repo_dir, **kwargs)


def vertex_docker_instructions(repo_dir: str,
                               jax_requirement: str) -> list[str]:
  """Dockerfile steps: requirements first so code edits keep the pip layer."""
  name = os.path.basename(os.path.normpath(repo_dir))
  return [
      'ENV LANG=C.UTF-8',
      f'COPY {name}/requirements.txt {_CONTAINER_DIR}/requirements.txt',
      (f'RUN python -m pip install --no-cache-dir -r '
       f'{_CONTAINER_DIR}/requirements.txt {shlex.quote(jax_requirement)}'),
      f'COPY {name}/ {_CONTAINER_DIR}',
      f'WORKDIR {_CONTAINER_DIR}',
  ]


def build_requirements(tpu: Union[TpuSpec, str]) -> Any:
  """xm.JobRequirements for a TpuSpec or --tpu string (needs xmanager)."""
  from xmanager import xm  # pylint: disable=g-import-not-at-top
  if isinstance(tpu, str):
    tpu = parse_tpu(tpu)
  return xm.JobRequirements(**requirements_kwargs(tpu))


def make_packageable(spec: LaunchSpec) -> Any:
  """The xm.Packageable that the experiment packages (needs xmanager)."""
  from xmanager import xm  # pylint: disable=g-import-not-at-top
  from xmanager import xm_local  # pylint: disable=g-import-not-at-top
  if spec.executor == 'local_gcloud':
    argv = spec.gcloud_argv
    return xm.binary(
        executor_spec=xm_local.Local.Spec(), path=argv[0], args=argv[1:])
  return xm.python_container(
      executor_spec=xm_local.Vertex.Spec(),
      path=spec.repo_dir,
      base_image=spec.base_image,
      docker_instructions=vertex_docker_instructions(
          spec.repo_dir, spec.jax_requirement),
      entrypoint=xm.ModuleName('pipeline.main'),
      args=pipeline_args(spec.config, spec.workdir, spec.overrides))


def make_job(spec: LaunchSpec, executable: Any) -> Any:
  """The xm.Job running a packaged executable (needs xmanager)."""
  from xmanager import xm  # pylint: disable=g-import-not-at-top
  from xmanager import xm_local  # pylint: disable=g-import-not-at-top
  requirements = build_requirements(spec.tpu)
  if spec.executor == 'local_gcloud':
    # Local ignores TPU requirements; they stay on the job as a record.
    executor = xm_local.Local(requirements=requirements)
  else:
    executor = xm_local.Vertex(requirements=requirements)
  return xm.Job(executable=executable, executor=executor, name='train')


def describe(spec: LaunchSpec) -> str:
  """Human-readable summary printed by --dry_run."""
  kwargs = ', '.join(
      f'{k}={v!r}' for k, v in requirements_kwargs(spec.tpu).items())
  lines = [
      f'executor: {spec.executor}',
      f'tpu: {spec.tpu.accelerator_type} ({spec.tpu.chips} chips, '
      f'{spec.tpu.num_hosts} host(s)); xm.JobRequirements({kwargs})',
  ]
  if spec.executor == 'local_gcloud':
    lines.append('command: ' + shlex.join(spec.gcloud_argv))
  else:
    lines.append(f'image: {spec.base_image} + '
                 + '; '.join(vertex_docker_instructions(
                     spec.repo_dir, spec.jax_requirement)))
    lines.append('args: python -m pipeline.main ' + shlex.join(
        pipeline_args(spec.config, spec.workdir, spec.overrides)))
  return '\n'.join(lines)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the launcher flags (called only when run as a program)."""
  fv = flag_values
  flags.DEFINE_string(
      'config', DEFAULT_CONFIG,
      'pipeline.main config, relative to the repository root (":arg" allowed).',
      flag_values=fv)
  flags.DEFINE_string(
      'workdir', None, 'gs:// output directory shared by all hosts.',
      flag_values=fv)
  flags.DEFINE_string(
      'tpu', None, f'TPU slice: {_TPU_FORMS}.', flag_values=fv)
  flags.DEFINE_enum(
      'executor', 'local_gcloud', EXECUTORS,
      'local_gcloud: gcloud tpu-vm ssh --worker=all on an existing TPU VM; '
      'vertex: Vertex AI custom job (TPU v2-8/v3-8 only).', flag_values=fv)
  flags.DEFINE_string(
      'tpu_name', '', 'Existing TPU VM name (local_gcloud).', flag_values=fv)
  flags.DEFINE_string('zone', '', 'TPU zone; empty: gcloud default.',
                      flag_values=fv)
  flags.DEFINE_string('project', '', 'GCP project; empty: gcloud default.',
                      flag_values=fv)
  flags.DEFINE_multi_string(
      'config_overrides', [],
      'KEY=VALUE, passed as --config.KEY=VALUE to pipeline.main; repeatable.',
      flag_values=fv)
  flags.DEFINE_string(
      'remote_dir', DEFAULT_REMOTE_DIR,
      'Checkout directory on the TPU hosts, relative to the home directory.',
      flag_values=fv)
  flags.DEFINE_bool(
      'install', True,
      'Create <remote_dir>/.venv and install requirements.txt + jax[tpu].',
      flag_values=fv)
  flags.DEFINE_string(
      'remote_python', 'python3',
      'Interpreter on the hosts that creates .venv; the pinned wheels need '
      'Python >= 3.11 (Ubuntu 22.04 TPU images ship 3.10).', flag_values=fv)
  flags.DEFINE_string(
      'git_url', '',
      'Clone/fetch this repository into --remote_dir on every host first; '
      'empty: the checkout must already be there.', flag_values=fv)
  flags.DEFINE_string('git_ref', 'main', 'Ref to check out with --git_url.',
                      flag_values=fv)
  flags.DEFINE_string('gcloud', 'gcloud', 'gcloud binary.', flag_values=fv)
  flags.DEFINE_string('base_image', DEFAULT_BASE_IMAGE,
                      'Base image for --executor=vertex.', flag_values=fv)
  flags.DEFINE_string('title', '', 'Experiment title; empty: derived.',
                      flag_values=fv)
  flags.DEFINE_string(
      'repo_dir', REPO_DIR,
      'Local checkout: --config is checked in it, the jax pin is read from '
      'its requirements.txt, and --executor=vertex builds the image from it.',
      flag_values=fv)
  flags.DEFINE_bool('dry_run', False,
                    'Print the job and exit without launching.',
                    flag_values=fv)


def spec_from_flags(fv: flags.FlagValues = flags.FLAGS) -> LaunchSpec:
  """Builds the LaunchSpec from parsed flags."""
  return make_launch_spec(
      config=fv.config, workdir=fv.workdir or '', tpu=fv.tpu or '',
      executor=fv.executor, tpu_name=fv.tpu_name, zone=fv.zone,
      project=fv.project, overrides=fv.config_overrides,
      remote_dir=fv.remote_dir, install=fv.install,
      remote_python=fv.remote_python, git_url=fv.git_url,
      git_ref=fv.git_ref, gcloud=fv.gcloud, base_image=fv.base_image,
      title=fv.title, repo_dir=os.path.abspath(fv.repo_dir))


def launch(spec: LaunchSpec) -> None:
  """Creates the experiment and adds the job (needs xmanager)."""
  from xmanager import xm_local  # pylint: disable=g-import-not-at-top
  title = spec.title or (
      f'pi0-energy {spec.tpu.accelerator_type} {spec.workdir}')
  with xm_local.create_experiment(experiment_title=title) as experiment:
    [executable] = experiment.package([make_packageable(spec)])
    experiment.add(make_job(spec, executable))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    spec = spec_from_flags(flags.FLAGS)
  except LaunchError as e:
    # Just the message: absl's usage text would bury it under the flag list.
    raise SystemExit(f'error: {e}') from e
  if flags.FLAGS.dry_run:
    print(describe(spec))
    return
  if not _HAVE_XMANAGER:
    raise SystemExit(
        'error: xmanager is not installed here; use its own environment: '
        'python3 -m venv .venv-xm && .venv-xm/bin/pip install -r '
        'xm_launch/requirements.txt (or pass --dry_run).')
  if spec.executor == 'local_gcloud' and shutil.which(spec.gcloud) is None:
    raise SystemExit(f'error: --gcloud={spec.gcloud!r}: not found on PATH.')
  if spec.executor == 'local_gcloud':
    # xm.binary wants a path that exists on this machine.
    spec = dataclasses.replace(spec, gcloud=shutil.which(spec.gcloud))
  try:
    launch(spec)
  except RuntimeError as e:
    # xm_local reports a failed job (e.g. gcloud's exit status) this way.
    raise SystemExit(f'error: launch failed: {e}') from e


_HAVE_XMANAGER = False


def run() -> None:
  """Program entry point."""
  global _HAVE_XMANAGER
  try:
    # Imported before flag parsing so that xmanager's --xm_* flags exist.
    # pylint: disable-next=g-import-not-at-top,unused-import
    from xmanager import xm_local
    _HAVE_XMANAGER = True
  except ImportError:
    pass
  define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
