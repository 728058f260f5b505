"""tsformer_jax.listing: the multi-label listing formats and their errors."""

import json

import numpy as np
import pytest

from tsformer_jax import listing

CLASSES = ['open', 'close', 'pour']


def test_text_and_json_lines_read_the_same(tmp_path):
  (tmp_path / 'v.csv').write_text(
      '# comment\n'
      'a.mp4 open,pour\n'
      '\n'
      'sub/b.mp4 2,pour\n'
      'c.mp4\n'
      'with space.mp4\tclose\n')
  (tmp_path / 'v.jsonl').write_text('\n'.join(json.dumps(r) for r in [
      dict(path='a.mp4', labels=['pour', 'open']),
      dict(path='sub/b.mp4', labels=[2]),
      dict(path='c.mp4', labels=[]),
      dict(path='with space.mp4', labels='close')]))
  text = listing.read(str(tmp_path / 'v.csv'), CLASSES)
  jsonl = listing.read(str(tmp_path / 'v.jsonl'), CLASSES)
  expected = [('a.mp4', (0, 2)), ('sub/b.mp4', (2,)), ('c.mp4', ()),
              ('with space.mp4', (1,))]
  for items in (text, jsonl):
    assert [(i.path, i.labels) for i in items] == [
        (str(tmp_path / p), labels) for p, labels in expected]
  assert [i.line for i in text] == [2, 4, 5, 6]


@pytest.mark.parametrize('content, line, words', [
    ('a.mp4 open\nb.mp4 open,jump\n', 2, "unknown label 'jump'"),
    ('a.mp4 open\nb.mp4 3\n', 2, "unknown label '3'"),
    ('a b.mp4 open\n', 1, '3 fields'),
])
def test_a_bad_line_is_named_by_its_number(tmp_path, content, line, words):
  path = tmp_path / 'v.txt'
  path.write_text(content)
  with pytest.raises(ValueError, match=f'v.txt:{line}: .*{words}') as e:
    listing.read(str(path), CLASSES)
  assert '\n' not in str(e.value)


def test_a_bad_json_line_is_named_by_its_number(tmp_path):
  path = tmp_path / 'v.jsonl'
  path.write_text('{"path": "a.mp4", "labels": ["open"]}\n{"labels": []}\n')
  with pytest.raises(ValueError, match=r'v.jsonl:2: expected'):
    listing.read(str(path), CLASSES)


def test_classes_and_multi_hot(tmp_path):
  (tmp_path / 'classes.txt').write_text('open\nclose\n\npour\n')
  assert listing.read_classes(str(tmp_path / 'classes.txt')) == CLASSES
  np.testing.assert_array_equal(listing.multi_hot((0, 2), 3), [1, 0, 1])
  (tmp_path / 'twice.txt').write_text('open\nopen\n')
  with pytest.raises(ValueError, match=r"twice: \['open'\]"):
    listing.read_classes(str(tmp_path / 'twice.txt'))
