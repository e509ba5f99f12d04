"""Shared fixtures: a tiny float32 Wan DiT, its diffusers twin with identical weights."""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.self_forcing import get_config
from kvjax import checkpoint as ckpt
from kvjax import references
from kvjax.model import WanConfig
from kvjax.sampler import SamplerConfig, clear_compile_cache


def pytest_addoption(parser):
  parser.addoption(
      '--real_checkpoint_dir', default=os.environ.get('KVJAX_REAL_CHECKPOINT_DIR'),
      help='folder with self_forcing_dmd.pt and Wan2.1-T2V-1.3B/: runs the weight-port checks on '
           'the real checkpoints (tests/real_checkpoint_test.py); env KVJAX_REAL_CHECKPOINT_DIR')


HAS_TORCH = (importlib.util.find_spec('torch') is not None
             and importlib.util.find_spec('diffusers') is not None)
requires_torch = pytest.mark.skipif(not HAS_TORCH, reason='needs the torch extra')


def tiny_config(**kw) -> WanConfig:
  base = WanConfig.from_dict(get_config('tiny').model)
  return base.replace(**{**dict(compute_dtype='float32', param_dtype='float32', text_len=8), **kw})


@pytest.fixture(scope='session')
def cfg32() -> WanConfig:
  return tiny_config()


@pytest.fixture(scope='session')
def sampler_cfg() -> SamplerConfig:
  return SamplerConfig.from_dict(get_config('tiny').sampler)


@pytest.fixture(scope='session')
def torch_twin(cfg32):
  """(diffusers model with random torch init, the same weights as kvjax params)."""
  if not HAS_TORCH:
    pytest.skip('needs the torch extra')
  from kvjax import reference_torch as rt
  from ports import dit as dit_port
  model = rt.build_diffusers(cfg32, seed=0)
  sd = dit_port.diffusers_to_original(rt.state_dict_numpy(model))
  nested = dit_port.original_to_params(sd, nnx.to_pure_dict(ckpt.abstract_params(cfg32)))
  return model, ckpt.params_from_nested(cfg32, nested)


@pytest.fixture(scope='session')
def text32(cfg32):
  rng = np.random.default_rng(123)
  return rng.standard_normal((1, cfg32.text_len, cfg32.text_dim)).astype(np.float32)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope='session', autouse=True)
def _reference_store(tmp_path_factory):
  """In-process runs store their BF16 references in a session folder, not the checkout's runs/
  (the configs' ``reference_dir`` default is read from ``references.DEFAULT_DIR``)."""
  default = references.DEFAULT_DIR
  references.DEFAULT_DIR = str(tmp_path_factory.mktemp('references'))
  yield
  references.DEFAULT_DIR = default


@pytest.fixture(scope='module', autouse=True)
def _release_compiled_code():
  """Drops every compiled executable after each test module.

  JAX keeps what it compiles (eager ops per shape, each jit's specialisations) for the life of the
  process, and XLA:CPU maps each executable's code into memory regions of its own (3 or more per
  executable, measured). Without this, an xdist worker reached 60,534 mappings by the end of the
  suite. Linux refuses mmap beyond vm.max_map_count (65,530 by default); XLA then logs "LLVM
  compilation error: Cannot allocate memory" and the worker dies inside a compilation (CI lost a
  worker so). Modules share few executables, so clearing costs little recompilation. The
  sampler's own store of compiled steps (bounded, see ``kvjax/sampler/rollout.py``) is emptied too.
  """
  yield
  jax.clear_caches()
  clear_compile_cache()
