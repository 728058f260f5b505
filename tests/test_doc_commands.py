"""Every command in the README and docs/ runs, as written, on stand-ins.

The commands are read from the pages' code blocks (continuation lines
joined). `RUNS` holds each one with what it runs on: its placeholders
(DIR, W, N, a.mp4, ...) become small stand-ins (generated videos, a few-step
demo run, a Hub cache holding a small TimeSformer under the id the docs
name), its optional `[...]` parts are left out (each flag they name is
checked to exist), and a paper-size config gets `SMALL` appended: the same
code path with a small model, a few steps and no ImageNet download.
`NOT_RUN` holds the rest, with the reason. A command added to a page without
an entry here fails `test_every_command_in_the_docs_has_an_entry`.
"""

import functools
import importlib
import json
import os
import pathlib
import re
import shlex
import socket
import subprocess
import sys

from absl import flags
import pytest

from tsformer_jax import cli
from tsformer_jax import config_lib

from conftest import counting_frames
from conftest import write_class_folders
from conftest import write_csv_split
from conftest import write_listing
import fake_hub

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
FENCE = re.compile(r'^```[^\n]*\n(.*?)^```', re.S | re.M)
HUB_ID = 'facebook/timesformer-base-finetuned-k400'
KINETICS = ROOT / 'tsformer_jax' / 'labels' / 'kinetics400.txt'

# The model of the demo (and of the Hub stand-in), with a few steps, for
# the paper-size configs.
SMALL = ('--config.model.hidden_size=64', '--config.model.depth=2',
         '--config.model.num_heads=4', '--config.model.mlp_dim=128',
         '--config.model.patch_size=8', '--config.model.num_frames=8',
         '--config.model.image_size=(32, 32)', '--config.data.sampling_rate=2',
         '--config.data.train_scales=(32, 40)', '--config.batch_size=8',
         '--config.grad_accum_steps=1', '--config.eval_batch_size=8',
         '--config.num_train_steps=2', '--config.checkpoint_every_steps=2',
         '--config.data.num_workers=2')
SCRATCH = ('--config.init_from.path=scratch',)
# A few steps of the demo, whose whole run docs/training.md reports.
FEW_STEPS = ('--config.num_train_steps=4', '--config.checkpoint_every_steps=4',
             '--config.data.num_workers=2')

NOT_RUN = {
    "pip install -e '.[test]'": 'CI installs with it (.ci/run)',
    'pip install -e .': 'a subset of the test install, which CI runs',
    "pip install -e '.[hub]'": 'huggingface_hub, which the test install has',
    'python -m pytest -n 2 -q tests': 'the test command CI runs (.ci/run)',
    'python -m pytest -m "not slow" -n 2 tests': 'the fast tier of it',
    'python -m tsformer_jax.convert SRC OUT': (
        'a synopsis; run as convert facebook/... k400'),
    'python -m tsformer_jax.export CHECKPOINT OUT': (
        'a synopsis; run as export W/checkpoints W/hf'),
}


def _commands(text):
  """The commands of a page's code blocks: continuations joined, comments
  and prompts dropped, `a && b` split."""
  found = []
  for block in FENCE.findall(text):
    for line in block.replace('\\\n', ' ').splitlines():
      line = re.sub(r'\s+#.*$', '', line).strip()
      for part in line.split(' && '):
        if re.match(r'(pip|python) ', part):
          found.append(re.sub(r'\s+', ' ', part.strip()))
  return found


def _optional(command):
  """(`command` without its `[...]` parts, the flags those parts name). An
  optional part starts after a space: `'.[hub]'` is no option."""
  required, optional, depth = [], [], 0
  for i, char in enumerate(command):
    if char == '[' and (depth or command[i - 1:i] == ' '):
      depth += 1
    if depth:
      optional.append(char)
    else:
      required.append(char)
    if char == ']' and depth:
      depth -= 1
  return (re.sub(r'\s+', ' ', ''.join(required)).strip(),
          re.findall(r'--([\w.]+)', ''.join(optional)))


@functools.cache
def doc_commands():
  """{command without optional parts: (pages, optional flags)}."""
  commands = {}
  for page in PAGES:
    for command in _commands(page.read_text(encoding='utf-8')):
      required, optional = _optional(command)
      pages, named = commands.setdefault(required, (set(), set()))
      pages.add(page.name)
      named.update(optional)
  return commands


class Stand:
  """The stand-ins the commands run on, made when first asked for."""

  def __init__(self, root: pathlib.Path, monkeypatch):
    self.root = root
    self.monkeypatch = monkeypatch

  def path(self, name):
    return self.root / name

  @functools.cached_property
  def videos(self):
    """a.mp4, b.webm and clip.mp4: synthetic_motion test videos."""
    from tsformer_jax.datasets import synthetic_motion  # pylint: disable=g-import-not-at-top
    from tsformer_jax.datasets import video_writer  # pylint: disable=g-import-not-at-top
    folder = self.path('videos')
    folder.mkdir()
    for i, name in enumerate(['a.mp4', 'b.webm', 'clip.mp4']):
      frames, _ = synthetic_motion.generate('test', i)
      write = (video_writer.write_webm if name.endswith('webm')
               else video_writer.write_mp4)
      write(str(folder / name), frames)
    return folder

  @functools.cached_property
  def listings(self):
    """train.csv and test.csv: labelled synthetic_motion videos."""
    folder = self.path('listed')
    folder.mkdir()
    return {f'{split}.csv': write_listing(folder, split, count)
            for split, count in (('train', 16), ('test', 6))}

  @functools.cached_property
  def folder(self):
    """A folder dataset: two classes, train/ and val/."""
    return write_class_folders(self.path('folder'), train=8, val=4)

  @functools.cached_property
  def kinetics(self):
    """A Kinetics-400 tree: train.csv, test.csv and their videos."""
    data = self.path('kinetics')
    write_csv_split(data, 'train', good=8)
    write_csv_split(data, 'test', good=4)
    return data

  @functools.cached_property
  def ssv2(self):
    """An SSv2 tree: the labels file, two lists and their webm videos."""
    from tsformer_jax import datasets  # pylint: disable=g-import-not-at-top
    from tsformer_jax.datasets import video_writer  # pylint: disable=g-import-not-at-top
    data = self.path('ssv2')
    data.mkdir()
    names = datasets.class_names(config_lib.get_config('divided', 'ssv2'))
    (data / 'something-something-v2-labels.json').write_text(
        json.dumps({name: str(i) for i, name in enumerate(names)}))
    items = [dict(id=str(i), label='', template=names[i], placeholders=[])
             for i in range(8)]
    for split, part in (('train', items), ('validation', items[:3])):
      (data / f'something-something-v2-{split}.json').write_text(
          json.dumps(part))
    for item in items:
      video_writer.write_webm(
          str(data / '20bn-something-something-v2' / f'{item["id"]}.webm'),
          counting_frames(24), fps=12)
    return data

  @functools.cached_property
  def hub(self):
    """A Hub cache holding a small TimeSformer under HUB_ID, offline,
    with Kinetics-400's classes."""
    from checkpoint_sources import hf_timesformer  # pylint: disable=g-import-not-at-top
    from checkpoint_sources import save_hf  # pylint: disable=g-import-not-at-top
    model = hf_timesformer(0, num_frames=8, image_size=32, patch_size=8,
                           hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128,
                           id2label=dict(enumerate(KINETICS.read_text(
                               ).split('\n')[:400])))
    local = save_hf(model, self.path('hf_model'), 'safetensors')
    cache = self.path('hub')
    fake_hub.cache_repo(cache, HUB_ID, [local / 'config.json',
                                        local / 'model.safetensors'])
    fake_hub.point_at(self.monkeypatch, cache)
    return cache

  @functools.cached_property
  def demo_run(self):
    """A workdir of a few demo steps (W, DIR/checkpoints)."""
    workdir = self.path('demo_run')
    run(['python', '-m', 'tsformer_jax.main',
         '--config=configs/divided.py:demo', f'--workdir={workdir}',
         *FEW_STEPS])
    return workdir

  @functools.cached_property
  def k400(self):
    """HUB_ID converted, as the docs' convert command writes it."""
    assert self.hub.is_dir()
    run(['python', '-m', 'tsformer_jax.convert', HUB_ID,
         str(self.path('k400'))])
    return self.path('k400')


def run(argv, env=None):
  """Runs `python -m MODULE ARGS` in this process (`cli.call`), or in a
  subprocess when `env` is given; asserts it succeeds."""
  assert argv[:2] == ['python', '-m'], argv
  if env is None:
    module = importlib.import_module(argv[2])
    assert cli.call(module.main, [argv[2].split('.')[-1], *argv[3:]]) == 0
    return None
  return subprocess.Popen([sys.executable, *argv[1:]], cwd=ROOT,
                          env=dict(os.environ, **env), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(process, timeout=900):
  output, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, output[-3000:]


def _bind(argv, values):
  """`argv` with each placeholder of `values` replaced where it is a whole
  argument or value, or begins one (`W/checkpoints`, `HOST0:1234`)."""
  out = []
  for arg in argv:
    name, eq, value = arg.rpartition('=') if arg.startswith('--') else (
        '', '', arg)
    for key, new in values.items():
      if value == key or re.match(re.escape(key) + r'[/:]', value):
        value = str(new) + value[len(key):]
        break
    out.append(name + eq + value)
  return out


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_demo(stand, argv):
  workdir = stand.path('quick' if '/tmp/tsformer_demo' in argv[-1] else 'demo')
  run(_bind(argv, {'/tmp/tsformer_demo': workdir, 'DIR': workdir})
      + list(FEW_STEPS))
  assert (workdir / 'results.json').is_file()


def _run_folder(stand, argv):
  workdir = stand.path('folder_run')
  run(_bind(argv, {'DIR': stand.folder, 'N': 2, 'W': workdir,
                   'CKPT': stand.demo_run / 'checkpoints', 'k400': stand.k400})
      + list(SMALL))
  assert (workdir / 'results.json').is_file()


def _run_predict(stand, argv):
  run(_bind(argv, {'W': stand.demo_run, 'DIR': stand.demo_run,
                   'k400': stand.k400,
                   **{name: stand.videos / name
                      for name in ('a.mp4', 'b.webm', 'clip.mp4')}}))


def _run_visualize(stand, argv):
  out = stand.path(f'rollout_{len(list(stand.root.glob("rollout*")))}')
  run(_bind(argv, {'W': stand.demo_run, 'DIR': stand.demo_run,
                   'a.mp4': stand.videos / 'a.mp4', 'OUT': out}))
  assert out.exists()


def _run_convert(stand, argv):
  assert stand.hub.is_dir()
  out = stand.path(f'converted_{len(list(stand.root.glob("converted*")))}')
  run(_bind(argv, {'k400': out, 'OUT': out}))
  assert any(out.iterdir())


def _run_export(stand, argv):
  out = stand.path('exported')
  run(_bind(argv, {'W/checkpoints': stand.demo_run / 'checkpoints',
                   'W/hf': out}))
  assert (out / 'config.json').is_file()


def _run_load_in_transformers(stand, argv):
  del argv
  if not (stand.demo_run / 'hf').is_dir():
    run(['python', '-m', 'tsformer_jax.export',
         f'{stand.demo_run}/checkpoints', f'{stand.demo_run}/hf'])
  command = next(c for c in doc_commands() if c.startswith('python -c'))
  code = shlex.split(command)[2].replace("'W/hf'", repr(
      str(stand.demo_run / 'hf')))
  subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT)


def _run_kinetics(stand, argv):
  """The paper's Kinetics config, on 8 CPU devices for a mesh."""
  workdir = stand.path(f'kinetics_{len(list(stand.root.glob("kinetics_*")))}')
  _finish(run(_bind(argv, {'DIR': workdir})
              + [f'--config.data.data_dir={stand.kinetics}']
              + list(SMALL + SCRATCH),
              env=dict(XLA_FLAGS='--xla_force_host_platform_device_count=8',
                       PYTHONPATH=str(ROOT))))
  assert (workdir / 'results.json').is_file()


def _run_two_hosts(stand, argv):
  port = _free_port()
  argv = _bind(argv, {'...': 'configs/divided.py:demo',
                      'DIR': stand.path('two_hosts'),
                      'HOST0': '127.0.0.1'})
  argv = [a.replace(':1234', f':{port}') for a in argv]
  processes = [run(_bind(argv, {'I': i}) + list(FEW_STEPS),
                   env=dict(PYTHONPATH=str(ROOT))) for i in (0, 1)]
  for process in processes:
    _finish(process)
  assert (stand.path('two_hosts') / 'results.json').is_file()


def _run_prepare(stand, argv):
  run(_bind(argv, {'/data/ssv2': stand.ssv2,
                   '/data/tfds': stand.path('tfds')}))
  assert any(stand.path('tfds').rglob('*.array_record*'))


def _run_ssv2_tfds(stand, argv):
  if not (stand.path('tfds')).is_dir():
    prepare = next(c for c in doc_commands() if 'prepare' in c)
    _run_prepare(stand, shlex.split(prepare))
  run(_bind(argv, {'DIR': stand.path('ssv2_run'),
                   '/data/tfds': stand.path('tfds')})
      + list(SMALL + SCRATCH) + [f'--config.data.data_dir={stand.ssv2}'])
  assert (stand.path('ssv2_run') / 'results.json').is_file()


def _run_attributes_demo(stand, argv):
  workdir = stand.path('attributes')
  run(_bind(argv, {'DIR': workdir}) + list(FEW_STEPS))
  assert 'eval_map' in json.loads((workdir / 'results.json').read_text())


def _run_threshold(stand, argv):
  workdir = stand.path('attributes')
  if not (workdir / 'results.json').is_file():
    _run_attributes_demo(stand, shlex.split(next(
        c for c in RUNS if 'synthetic_attributes' in c)))
  run(_bind(argv, {'DIR': workdir, 'a.mp4': stand.videos / 'a.mp4'}))


def _run_features(stand, argv):
  out = stand.path(f'features_{len(list(stand.root.glob("features_*")))}')
  argv = _bind(argv, {'CKPT': stand.demo_run / 'checkpoints',
                      'LIST_OR_DIR': stand.videos, 'DIR': out, 'S': 8,
                      'feats': stand.path('feats'), **stand.listings})
  run(argv)
  written = next(a for a in argv if a.startswith('--out=')).split('=', 1)[1]
  assert any(pathlib.Path(written).glob('*.npy'))


def _run_probe(stand, argv):
  for split in ('train', 'test'):
    if not (stand.path('feats') / split).is_dir():
      _run_features(stand, shlex.split(next(
          c for c in RUNS if f'--out=feats/{split}' in c)))
  run(_bind(argv, {'feats': stand.path('feats')}))


def _run_benchmark(stand, argv):
  run(_bind(argv, {'DIR': stand.kinetics, '16': 2}))


RUNS = {
    'python -m tsformer_jax.main --config=configs/divided.py:demo '
    '--workdir=/tmp/tsformer_demo': _run_demo,
    'python -m tsformer_jax.main --config=configs/divided.py:demo '
    '--workdir=DIR': _run_demo,
    'python -m tsformer_jax.main --config=configs/divided.py:folder '
    '--config.data.data_dir=DIR --config.model.num_classes=N '
    '--config.init_from.path=CKPT --workdir=W': _run_folder,
    'python -m tsformer_jax.main --config=configs/divided.py:folder '
    '--config.data.data_dir=DIR --config.model.num_classes=N '
    '--config.init_from.path=k400 --workdir=W': _run_folder,
    'python -m tsformer_jax.predict --checkpoint=W/checkpoints a.mp4 b.webm':
        _run_predict,
    'python -m tsformer_jax.predict --checkpoint=DIR/checkpoints a.mp4 '
    'b.webm': _run_predict,
    'python -m tsformer_jax.predict --checkpoint=k400 clip.mp4': _run_predict,
    'python -m tsformer_jax.predict --checkpoint=W/checkpoints clip.mp4':
        _run_predict,
    'python -m tsformer_jax.visualize --checkpoint=W/checkpoints a.mp4 '
    '--out=OUT': _run_visualize,
    'python -m tsformer_jax.visualize --checkpoint=DIR/checkpoints a.mp4 '
    '--out=OUT': _run_visualize,
    f'python -m tsformer_jax.convert {HUB_ID} k400': _run_convert,
    f'python -m tsformer_jax.convert {HUB_ID} OUT': _run_convert,
    'python -m tsformer_jax.export W/checkpoints W/hf': _run_export,
    'python -c "import transformers; transformers.'
    "TimesformerForVideoClassification.from_pretrained('W/hf')\"":
        _run_load_in_transformers,
    'python -m tsformer_jax.main --config=configs/divided.py --workdir=DIR':
        _run_kinetics,
    'python -m tsformer_jax.main --config=configs/divided.py --workdir=DIR '
    "--config.sharding.shape='(2, 4)'": _run_kinetics,
    'python -m tsformer_jax.main --config=... --workdir=DIR '
    '--coordinator_address=HOST0:1234 --num_processes=2 --process_id=I':
        _run_two_hosts,
    'python -m tsformer_jax.datasets.prepare '
    '--config=configs/divided.py:ssv2 --config.data.data_dir=/data/ssv2 '
    '--out=/data/tfds': _run_prepare,
    'python -m tsformer_jax.main --config=configs/divided.py:ssv2 '
    '--workdir=DIR --config.data.format=tfds --config.data.tfds_dir=/data/tfds':
        _run_ssv2_tfds,
    'python -m tsformer_jax.datasets.benchmark --config=configs/divided.py '
    '--config.data.data_dir=DIR --batches=16': _run_benchmark,
    'python -m tsformer_jax.main '
    '--config=configs/divided.py:demo,dataset=synthetic_attributes '
    '--workdir=DIR': _run_attributes_demo,
    'python -m tsformer_jax.predict --checkpoint=DIR/checkpoints a.mp4 '
    '--threshold=0.5': _run_threshold,
    'python -m tsformer_jax.features --checkpoint=CKPT --videos=LIST_OR_DIR '
    '--out=DIR --stride_frames=S': _run_features,
    'python -m tsformer_jax.features --checkpoint=CKPT --videos=train.csv '
    '--out=feats/train --stride_frames=16': _run_features,
    'python -m tsformer_jax.features --checkpoint=CKPT --videos=test.csv '
    '--out=feats/test --stride_frames=16': _run_features,
    'python -m tsformer_jax.probe --train=feats/train --test=feats/test':
        _run_probe,
}


def test_every_command_in_the_docs_has_an_entry():
  found = set(doc_commands())
  assert found - set(RUNS) - set(NOT_RUN) == set()
  assert (set(RUNS) | set(NOT_RUN)) - found == set()  # No stale entries.


def test_reading_commands_joins_lines_and_drops_options():
  text = ('```bash\n$ ignored\npython -m m --a=1 \\\n    [--b=2 [--c]] '
          "--d='(2, 4)'  # a comment\npip install x && python -m n\n```\n")
  assert _commands(text) == [
      "python -m m --a=1 [--b=2 [--c]] --d='(2, 4)'", 'pip install x',
      'python -m n']
  assert _optional(_commands(text)[0]) == (
      "python -m m --a=1 --d='(2, 4)'", ['b', 'c'])


@pytest.mark.parametrize('command', sorted(
    c for c in doc_commands() if c.startswith('python -m tsformer_jax')))
def test_every_flag_a_command_names_exists(command):
  """Required and optional flags alike: absl flags of the module, or fields
  of the config."""
  module = command.split()[2]
  importlib.import_module(module)
  config = config_lib.get_config('divided', 'demo')
  by_module = flags.FLAGS.flags_by_module_dict()
  defined = {flag.name for name in (module, 'tsformer_jax.cli')
             for flag in by_module.get(name, [])}
  for name in sorted(set(re.findall(r'--([\w.]+)', command))
                     | doc_commands()[command][1]):
    if name.startswith('config.'):
      node = config
      for key in name.split('.')[1:]:
        assert key in node, f'{command}: --{name}'
        node = node[key]
    else:
      assert name in defined, f'{command}: --{name}'


@pytest.fixture(scope='module')
def stand(tmp_path_factory):
  with pytest.MonkeyPatch.context() as monkeypatch:
    monkeypatch.chdir(ROOT)
    yield Stand(tmp_path_factory.mktemp('stand'), monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize('command', sorted(RUNS))
def test_the_command_runs(command, stand):
  RUNS[command](stand, shlex.split(command))
