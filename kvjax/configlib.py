"""Shared behaviour of kvjax's frozen dataclass configs (model, text encoder, VAE, sampler)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


class FrozenConfig:
  """Mixin for frozen dataclasses: ``replace``, ``from_dict`` (unknown keys raise), ``to_dict``.

  Subclasses set ``_what`` (used in error messages).
  """
  _what = 'config'

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]):
    """Builds from a mapping (ConfigDict, config.json); unknown keys raise naming the valid ones."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f'unknown {cls._what} keys {unknown}; valid: {sorted(names)}')
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready fields (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
