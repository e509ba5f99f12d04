"""Registry of cache methods: canonical paper names (case-insensitive) plus short aliases."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvjax.cache.base import CacheMethod

_METHODS: dict[str, type[CacheMethod]] = {}
_ALIASES: dict[str, str] = {}


def register(cls: type[CacheMethod]) -> type[CacheMethod]:
  """Class decorator: registers ``cls.name`` and its aliases (all lower-cased)."""
  key = cls.name.upper()
  if key in _METHODS:
    raise ValueError(f'cache method {cls.name} registered twice')
  _METHODS[key] = cls
  for a in cls.aliases:
    a = a.lower()
    if a in _ALIASES and _ALIASES[a] != key:
      raise ValueError(f'alias {a!r} already names {_ALIASES[a]}')
    _ALIASES[a] = key
  return cls


def names() -> list[str]:
  """The canonical method names, in registration order."""
  return [cls.name for cls in _METHODS.values()]


def aliases() -> dict[str, str]:
  """alias -> canonical name."""
  return {a: _METHODS[k].name for a, k in _ALIASES.items()}


def canonical(name: str) -> str:
  """Resolves a name or alias (case-insensitive); raises ValueError listing the valid names."""
  if not isinstance(name, str) or not name:
    raise ValueError(f'cache method name must be a non-empty string (got {name!r})')
  key = name.strip().upper()
  if key in _METHODS:
    return _METHODS[key].name
  alias = name.strip().lower()
  if alias in _ALIASES:
    return _METHODS[_ALIASES[alias]].name
  raise ValueError(f'unknown cache method {name!r}. Valid names: {", ".join(names())}. '
                   f'Aliases: {", ".join(sorted(_ALIASES))}')


def get(name: str, **overrides: Any) -> CacheMethod:
  """Builds the method ``name`` with parameter ``overrides``; unknown parameters raise."""
  cls = _METHODS[canonical(name).upper()]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    valid = ', '.join(sorted(fields)) or '(none)'
    raise ValueError(f'{cls.name} has no parameter(s) {unknown}; valid parameters: {valid}')
  return cls(**overrides)


def describe() -> list[dict[str, Any]]:
  """One row per method: name, aliases, family, parameters (defaults), description."""
  rows = []
  for key, cls in _METHODS.items():
    rows.append(dict(name=cls.name,
                     aliases=sorted(a for a, k in _ALIASES.items() if k == key),
                     family=cls.family, params=cls().params(), description=cls.description))
  return rows
