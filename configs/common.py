"""Helpers shared by the config files."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any


def parse_arg(arg: str | None, spec: Mapping[str, Any],
              shorthands: Mapping[str, Sequence[str]] = ()
              ) -> dict[str, Any]:
  """A config file's arg, big_vision style: 'variant=hr,dataset=ssv2'.

  Values are typed from `spec`, which also holds the defaults; unknown
  keys fail with the valid ones. A bare word is taken as `key=word` for
  the first key of `shorthands` that lists it, so 'hr,ssv2' reads as
  'variant=hr,dataset=ssv2'.
  """
  values = dict(spec)
  given = set()
  for part in (arg or '').split(','):
    part = part.strip()
    if not part:
      continue
    if '=' in part:
      key, value = (s.strip() for s in part.split('=', 1))
    else:
      key = next((k for k, words in dict(shorthands).items()
                  if part.lower() in words), None)
      value = part.lower()
      if key is None:
        choices = '; '.join(f'{k}: {sorted(w)}'
                            for k, w in dict(shorthands).items())
        raise ValueError(f'Unknown config arg {part!r} in {arg!r}; a bare '
                         f'word is one of ({choices}), or write key=value '
                         f'with a key of {sorted(spec)}.')
    if key not in spec:
      raise ValueError(f'Unknown config arg key {key!r} in {arg!r}; valid: '
                       f'{sorted(spec)}.')
    if key in given:
      raise ValueError(f'{key!r} given twice in {arg!r}.')
    given.add(key)
    values[key] = _typed(value, spec[key], key)
  return values


def _typed(value: str, default: Any, key: str) -> Any:
  if isinstance(default, bool):
    if value.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'{key}={value!r}: expected true or false.')
    return value.lower() in ('true', '1')
  if isinstance(default, (int, float)):
    try:
      return type(default)(value)
    except ValueError:
      raise ValueError(f'{key}={value!r}: expected a '
                       f'{type(default).__name__}.') from None
  return value
