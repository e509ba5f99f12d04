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


def derive(base: type[CacheMethod], name: str, aliases: tuple[str, ...], description: str,
           **defaults: Any) -> type[CacheMethod]:
  """An unregistered subclass of ``base`` named ``name`` whose parameters default to ``defaults``.

  It inherits every other class attribute of ``base`` (``family``, ``in_study``,
  ``is_reference``, ...).
  """
  fields = {f.name: f for f in dataclasses.fields(base)}
  unknown = sorted(set(defaults) - set(fields))
  if unknown:
    raise ValueError(f'{base.__name__} has no parameter(s) {unknown}')
  cls = dataclasses.make_dataclass(
      name, [(k, fields[k].type, dataclasses.field(default=v)) for k, v in defaults.items()],
      bases=(base,), frozen=True)
  cls.name, cls.aliases, cls.description = name, tuple(aliases), description
  cls.__module__ = base.__module__
  return cls


def variant(base: type[CacheMethod], name: str, aliases: tuple[str, ...], description: str,
            **defaults: Any) -> type[CacheMethod]:
  """A registered subclass of ``base`` named ``name`` whose parameters default to ``defaults``."""
  return register(derive(base, name, aliases, description, **defaults))


def parse_overrides(name: str, text: str | None) -> dict[str, Any]:
  """Parses 'key=value,key=value' for method ``name``, coercing values to the parameters' types."""
  if not text:
    return {}
  cls = _METHODS[canonical(name).upper()]
  fields = {f.name: f for f in dataclasses.fields(cls)}
  out: dict[str, Any] = {}
  for item in text.split(','):
    if '=' not in item:
      raise ValueError(f'method argument {item!r} is not key=value')
    key, val = (x.strip() for x in item.split('=', 1))
    if key not in fields:
      raise ValueError(f'{cls.name} has no parameter {key!r}; valid parameters: '
                       f'{", ".join(sorted(fields)) or "(none)"}')
    default = fields[key].default
    if isinstance(default, bool):
      if val.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'{cls.name}: {key} expects true or false (got {val!r})')
      out[key] = val.lower() in ('true', '1')
    elif isinstance(default, (int, float)):
      kind = type(default)
      try:
        out[key] = kind(val)
      except ValueError:
        raise ValueError(f'{cls.name}: {key} expects {"an integer" if kind is int else "a number"} '
                         f'(got {val!r})') from None
    else:
      out[key] = val
  return out


def names() -> list[str]:
  """The canonical method names, in registration order."""
  return [cls.name for cls in _METHODS.values()]


def study_names() -> tuple[str, ...]:
  """The names of the study's table rows (``CacheMethod.in_study``), in registration order,
  which is the tables' order."""
  return tuple(cls.name for cls in _METHODS.values() if cls.in_study)


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
  """Builds the method ``name`` with parameter ``overrides``; unknown parameters raise.

  Construction goes through the class's ``build`` hook (``CacheMethod.build``), so a parameter
  may select another class (``get('AGE_TIER_INT2', recency='age')`` is an ``AgeTierByAge``, ``age_recency.py``).
  """
  cls = _METHODS[canonical(name).upper()]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    valid = ', '.join(sorted(fields)) or '(none)'
    raise ValueError(f'{cls.name} has no parameter(s) {unknown}; valid parameters: {valid}')
  return cls.build(**overrides)


def describe() -> list[dict[str, Any]]:
  """One row per method: name, aliases, family, group ('study': a row of the study's tables,
  'extra': the study's profiling pass and kvjax's fixes, 'beyond': methods after the study),
  parameters (defaults), description."""
  rows = []
  for key, cls in _METHODS.items():
    rows.append(dict(name=cls.name,
                     aliases=sorted(a for a, k in _ALIASES.items() if k == key),
                     family=cls.family, params=cls().params(),
                     group='study' if cls.in_study else 'beyond' if cls.beyond_study else 'extra',
                     description=cls.description))
  return rows
