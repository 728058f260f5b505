r"""Scores frozen features: a linear probe and k-NN (`probing`).

  python -m tsformer_jax.probe --train=FEATURES_TRAIN --test=FEATURES_TEST
      [--train_labels=LISTING --test_labels=LISTING] [--classes=FILE]
      [--k=20] [--temperature=0.07] [--seed=0] [--json]

FEATURES_*: a folder `python -m tsformer_jax.features` wrote (its
`features.json` holds the labels), or an .npz from `predict
--features_out` with the listing of its videos (`--*_labels`; classes from
`--classes`, else `classes.txt` beside the listing, else the folder's
`features.json`). A listing given with a folder replaces its labels.
Prints a table (method, metric, value, n_train, n_test) and the weight
decay the probe chose; `--json` prints one JSON document instead.
Videos without features are left out, with one line per set saying how
many.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import sys

from absl import flags

from tsformer_jax import cli
from tsformer_jax import probing

_TRAIN = flags.DEFINE_string('train', None, 'Train features: a features '
                             'folder or a predict --features_out .npz.')
_TEST = flags.DEFINE_string('test', None, 'Test features, as --train.')
_TRAIN_LABELS = flags.DEFINE_string('train_labels', None, 'Listing of the '
                                    'train videos and their labels.')
_TEST_LABELS = flags.DEFINE_string('test_labels', None, 'Listing of the '
                                   'test videos and their labels.')
_K = flags.DEFINE_integer('k', 20, 'Neighbours that vote in k-NN.',
                          lower_bound=1)
_TEMPERATURE = flags.DEFINE_float('temperature', 0.07, 'k-NN votes weigh '
                                  'exp(cosine / temperature).')
flags.register_validator(_TEMPERATURE, lambda t: t > 0, 'must be above 0.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the held-out split that '
                             'chooses the weight decay.')


def _left_out_line(name: str, path: str, left_out: dict[str, int]) -> str:
  counts = ', '.join(f'{n} {why}' for why, n in left_out.items())
  return (f'probe: {name} ({path}): {sum(left_out.values())} videos left '
          f'out ({counts}).')


@cli.takes(cli.JSON, cli.CLASSES)
def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise cli.Error(f'Unexpected arguments {argv[1:]}: pass --train and '
                    '--test (--help shows more).')
  if not _TRAIN.value or not _TEST.value:
    raise cli.Error('Pass --train=FEATURES and --test=FEATURES (a features '
                    'folder or a predict --features_out .npz).')
  with cli.expected_as_error():
    train = probing.load(_TRAIN.value, _TRAIN_LABELS.value, cli.CLASSES.value)
    test = probing.load(_TEST.value, _TEST_LABELS.value, cli.CLASSES.value)
    for name, features in (('train', train), ('test', test)):
      if features.left_out:
        print(_left_out_line(name, features.source, features.left_out),
              file=sys.stderr)
    result = probing.evaluate(train, test, k=_K.value,
                              temperature=_TEMPERATURE.value,
                              seed=_SEED.value)
  if cli.JSON.value:
    print(json.dumps(dict(result, train=_TRAIN.value, test=_TEST.value),
                     indent=1))
  else:
    print(probing.table(result))
    print(f'linear probe weight decay {result["linear"]["weight_decay"]:g} '
          f'(of {len(result["linear"]["held_out"])}, on a held-out '
          f'{probing.HELD_OUT:.0%} of train); k-NN k={result["knn"]["k"]}, '
          f'temperature {result["knn"]["temperature"]:g}.')
  return 0


if __name__ == '__main__':
  cli.run(main)
