"""The README and docs/ against the tree: links, commands, the code map.

Fast, and nothing is run: the checks read the Markdown and parse the
package's source with `ast`.
"""

import ast
import functools
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
PACKAGE = ROOT / 'tsformer_jax'
PAGES = sorted([README, ROOT / 'experiments' / 'README.md',
                ROOT / 'notebooks' / 'README.md',
                *(ROOT / 'docs').glob('*.md')])
MAX_README_LINES = 330
QUICKSTART = [
    'pip install -e . && python -m tsformer_jax.main '
    '--config=configs/divided.py:demo --workdir=/tmp/tsformer_demo',
    "pip install -e '.[test]' && python -m pytest -n 2 -q tests",
]
# [text](target) and ![alt](target); the target ends at a space or ')'.
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)[^)]*\)')
FENCE = re.compile(r'^```.*?^```', re.S | re.M)


def _rel(path):
  return path.relative_to(ROOT).as_posix()


def _prose(path):
  """The page without its fenced code blocks."""
  return FENCE.sub('', path.read_text(encoding='utf-8'))


def _slug(heading):
  """GitHub's anchor for a heading."""
  text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
  return text.replace(' ', '-')


def _anchors(path):
  return {_slug(line.lstrip('#')) for line in _prose(path).splitlines()
          if line.startswith('#')}


def test_the_pages_exist():
  assert (ROOT / 'docs').is_dir()
  for path in PAGES:
    assert path.is_file(), _rel(path)
  assert len(PAGES) >= 8, [_rel(p) for p in PAGES]


@pytest.mark.parametrize('page', PAGES, ids=_rel)
def test_every_relative_link_reaches_a_file(page):
  links = LINK.findall(_prose(page))
  broken = []
  for target in links:
    if re.match(r'[a-z]+:', target):  # https:, mailto:
      continue
    file, _, anchor = target.partition('#')
    path = (page.parent / file).resolve() if file else page
    if not path.exists():
      broken.append(f'{target}: no such file')
    elif anchor and anchor not in _anchors(path):
      broken.append(f'{target}: no heading #{anchor} in {_rel(path)}')
  assert not broken, f'{_rel(page)}: ' + '; '.join(broken)


def test_the_readme_links_every_docs_page():
  linked = {(README.parent / t.partition('#')[0]).resolve()
            for t in LINK.findall(_prose(README))}
  missing = [_rel(p) for p in (ROOT / 'docs').glob('*.md')
             if p.resolve() not in linked]
  assert not missing, f'README.md links no {missing}'


def test_the_readme_is_a_front_door():
  lines = README.read_text(encoding='utf-8').splitlines()
  assert len(lines) <= MAX_README_LINES, (
      f'README.md has {len(lines)} lines; move details into docs/')


def _quickstart_block():
  text = README.read_text(encoding='utf-8')
  section = text.split('\n## Quickstart\n', 1)[1].split('\n## ', 1)[0]
  block = re.search(r'^```bash\n(.*?)^```', section, re.S | re.M)
  assert block, 'no bash block in the Quickstart'
  return block.group(1).splitlines()


def test_the_quickstart_is_the_two_commands():
  assert _quickstart_block() == QUICKSTART


def test_ci_runs_the_readmes_test_command():
  ci = (ROOT / '.ci' / 'run').read_text(encoding='utf-8').splitlines()
  assert _quickstart_block()[1] in [line.strip() for line in ci]


def _named(pattern):
  """{match: [pages naming it]} over the README, docs/ and experiments/."""
  found = {}
  for page in PAGES:
    for name in re.findall(pattern, page.read_text(encoding='utf-8')):
      found.setdefault(name, []).append(_rel(page))
  return found


def test_every_module_run_with_python_m_exists_and_runs_as_main():
  modules = _named(r'python -m (tsformer_jax(?:\.\w+)*)')
  assert 'tsformer_jax.main' in modules
  for name, pages in modules.items():
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin, f'{name} ({pages})'
    source = pathlib.Path(spec.origin).read_text(encoding='utf-8')
    assert "if __name__ == '__main__':" in source, (
        f'{name} ({pages}) is not a program')


def test_every_config_file_named_exists():
  for name, pages in _named(r'configs/(\w+)\.py').items():
    assert (ROOT / 'configs' / f'{name}.py').is_file(), f'{name} ({pages})'


@functools.cache
def _test_names():
  names = set()
  for path in (ROOT / 'tests').glob('*.py'):
    names.add(path.stem)
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
      if isinstance(node, ast.FunctionDef) and node.name.startswith('test_'):
        names.add(node.name)
  return names


def test_every_test_the_docs_cite_exists():
  # Config fields such as `config.data.test_num_clips` follow a dot, and
  # flags such as `--test_labels` a dash.
  cited = _named(r'(?<![.\w-])(test_\w+)')
  assert 'test_killed_run_resumes_to_the_same_parameters' in cited
  missing = {n: p for n, p in cited.items() if n not in _test_names()}
  assert not missing, f'no such test (or test file): {missing}'


def test_experiments_readme_lists_every_script_and_result():
  text = (ROOT / 'experiments' / 'README.md').read_text(encoding='utf-8')
  experiments = ROOT / 'experiments'
  for script in sorted(experiments.glob('*.py')):
    assert f'`{script.name}`' in text, script.name
    # A module the scripts share (no __main__ block) has no command.
    if "__name__ == '__main__'" in script.read_text(encoding='utf-8'):
      assert f'python experiments/{script.name}' in text, script.name
  for script in sorted(experiments.glob('*.sh')):
    assert f'bash experiments/{script.name}' in text, script.name
  for result in sorted((experiments / 'results').glob('*')):
    if result.suffix in ('.md', '.log', '.png'):
      assert f'results/{result.name}' in text, result.name


# The code map: its entries in order, each with the modules it stands for.


def _module_name(path):
  parts = list(path.relative_to(ROOT).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


@functools.cache
def _modules():
  """{module name: source path} of the package."""
  return {_module_name(p): p for p in PACKAGE.rglob('*.py')}


def _imports(name):
  """The package modules `name` imports (anywhere in its source)."""
  path = _modules()[name]
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(parts + ([base] if base else []))
      # `from a import b`: the module a.b where there is one, else a.
      targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in _modules()
                 or f'{base}.{a.name}'.startswith('tsformer_jax.configs.')
                 else base for a in node.names]
    else:
      continue
    found.update(t for t in targets
                 if t == 'tsformer_jax' or t.startswith('tsformer_jax.'))
  return found


@functools.cache
def _code_map():
  """[(module prefix, is a package, is an entry point)] in the map's order.

  `configs/` stands for tsformer_jax.configs; under `tsformer_jax/`, an entry
  at two spaces is a module (`x.py`) or package (`x/`) of the package, and
  one at four spaces a module of the package above it.
  """
  text = README.read_text(encoding='utf-8')
  section = text.split('\n## Code map\n', 1)[1].split('\n## ', 1)[0]
  block = re.search(r'^```\n(.*?)^```', section, re.S | re.M).group(1)
  entries, package = [], None
  for line in block.splitlines():
    match = re.match(r'^( {0,4})(\S+)(.*)$', line)
    if not match:
      continue
    indent, name, rest = len(match.group(1)), match.group(2), match.group(3)
    cli = '(CLI)' in rest
    if indent == 0:
      if name == 'configs/':
        entries.append(('tsformer_jax.configs', True, cli))
      continue
    if indent == 4:
      parent = package
    else:
      parent = 'tsformer_jax'
    stem = name.rstrip('/').removesuffix('.py')
    module = parent if stem == '__init__' else f'{parent}.{stem}'
    entries.append((module, name.endswith('/'), cli))
    if indent == 2 and name.endswith('/'):
      package = module
  return entries


def _entry_of(module):
  """The index of the map entry that stands for `module`: the most specific
  one (a module, or a package holding it)."""
  best = None
  for i, (prefix, is_package, _) in enumerate(_code_map()):
    if module == prefix or (is_package and module.startswith(prefix + '.')):
      if best is None or len(prefix) > len(_code_map()[best][0]):
        best = i
  return best


def _folder(module):
  """The package folder (`datasets`, `checkpoints`, ...) holding `module`,
  or None for a module at the package's top."""
  parts = module.split('.')
  if len(parts) >= 2 and (PACKAGE / parts[1]).is_dir():
    return parts[1]
  return None


def _entry_points():
  return {name for name, path in _modules().items()
          if "if __name__ == '__main__':" in path.read_text(encoding='utf-8')}


def test_the_code_map_names_what_exists_and_all_of_it():
  for prefix, is_package, _ in _code_map():
    if prefix == 'tsformer_jax.configs':
      path = ROOT / 'configs'
    else:
      path = ROOT.joinpath(*prefix.split('.'))
    if prefix == 'tsformer_jax':
      assert (PACKAGE / '__init__.py').is_file()
    elif is_package:
      assert path.is_dir(), f'the code map names {prefix}/, not in the tree'
    else:
      assert path.with_suffix('.py').is_file(), f'no {prefix}'
  unmapped = sorted(m for m in _modules() if _entry_of(m) is None)
  assert not unmapped, f'the code map lacks {unmapped}'
  top = {p.name for p in PACKAGE.iterdir()
         if p.suffix == '.py' or (p.is_dir() and p.name != '__pycache__')}
  mapped = {prefix.split('.')[1] if '.' in prefix else '__init__'
            for prefix, _, _ in _code_map() if prefix.startswith('tsformer_')}
  assert {p.removesuffix('.py') for p in top} <= mapped | {'configs'}


def test_the_code_map_marks_exactly_the_entry_points():
  marked = {prefix for prefix, _, cli in _code_map() if cli}
  assert marked == _entry_points()


def test_modules_import_only_what_the_code_map_puts_above_them():
  """Each module imports only modules above it in the map or in its own
  folder; entry points also import `cli.py`; no other module imports
  `cli.py`, and no module an entry point (what two of them share lives in
  `cli.py` or the library)."""
  entry_points = _entry_points()
  shared = 'tsformer_jax.cli'
  assert entry_points >= {'tsformer_jax.main', 'tsformer_jax.predict',
                          'tsformer_jax.datasets.prepare'}
  wrong = []
  for module in sorted(_modules()):
    here = _entry_of(module)
    if here is None:  # test_the_code_map_names_what_exists_and_all_of_it
      continue
    for target in sorted(_imports(module)):
      there = _entry_of(target)
      same_folder = _folder(module) is not None and (
          _folder(module) == _folder(target))
      if target in entry_points or (target == shared and
                                    module not in entry_points):
        wrong.append(f'{module} imports the entry point (or cli) {target}')
      elif target == shared and module in entry_points:
        continue
      elif there is None:
        wrong.append(f'{module} imports {target}, not in the code map')
      elif there >= here and not same_folder:
        wrong.append(f'{module} imports {target}, listed below it')
  assert not wrong, '\n'.join(wrong)


def test_the_import_check_sees_imports():
  # The parser finds relative, nested and `from package import module`
  # imports, so the rule above cannot pass by seeing nothing.
  assert 'tsformer_jax.cli' in _imports('tsformer_jax.datasets.benchmark')
  assert 'tsformer_jax.sharding' in _imports('tsformer_jax.datasets.benchmark')
  assert 'tsformer_jax.checkpoints.export' in _imports('tsformer_jax.export')
  assert 'tsformer_jax.configs.default' in _imports('tsformer_jax.config_lib')
  assert 'tsformer_jax.datasets.registry' in _imports('tsformer_jax.datasets')
  assert len(_code_map()) >= 20
