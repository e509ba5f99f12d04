"""launch/bench_world.py: the method selection, the ordering lines, and a
short end-to-end run on the shipped world model (whatever weights are there)."""

import json

import numpy as np
import pytest
from scipy import stats

from kvjax import cache as kvcache
from kvjax import metrics
from kvjax.sampler import SelfForcing
from launch import bench_world as bw


class TestSelection:

  def test_all_is_the_study_in_table_order(self):
    assert bw.select_methods('all') == list(kvcache.PAPER_NAMES)
    assert len(bw.select_methods('all')) == 33

  def test_aliases_order_bf16_first_and_duplicates(self):
    got = bw.select_methods('kivi2, rtn_int4,KIVI_INT2,softprune_int4')
    order = list(kvcache.PAPER_NAMES)
    assert got[0] == 'BF16'
    assert set(got) == {'BF16', 'KIVI_INT2', 'RTN_INT4', 'FLOWCACHE_SOFT_PRUNE_INT4'}
    assert [order.index(n) for n in got] == sorted(order.index(n) for n in got)

  def test_unknown_name_is_an_error(self):
    with pytest.raises(ValueError, match='unknown cache method .*Valid names'):
      bw.select_methods('rtn_int3')

  def test_config_variant(self):
    assert bw.config_variant('world_long') == 'world_long'
    assert bw.config_variant('configs/self_forcing.py:world') == 'world'
    with pytest.raises(ValueError, match='must be a variant'):
      bw.config_variant('configs/other.py:world')


def _row(name, family, psnr, slope, ratio=2.0, passed=1):
  return dict(method=name, family=family, finite=True, video_psnr=psnr, psnr_slope=slope,
              ratio=ratio, study_ratio=ratio, last_window_psnr=psnr - 1, checks_passed=passed)


class TestOrderings:

  def test_bit_class_leaves_mixed_and_unnamed_out(self):
    assert bw.bit_class('RTN_INT2') == 'INT2'
    assert bw.bit_class('FLOWCACHE_NATIVE_SOFT_PRUNE_INT4') == 'INT4'
    assert bw.bit_class('SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT2') is None
    assert bw.bit_class('RTN_K2_V4') is None and bw.bit_class('FLOWCACHE_NATIVE') is None

  def test_lines_from_the_numbers(self):
    rows = [_row('BF16', 'BF16', 100.0, 0.0, ratio=1.0, passed=3),
            _row('RTN_INT4', 'RTN', 40.0, -0.1),
            _row('RTN_INT2', 'RTN', 30.0, -0.3),
            _row('KIVI_INT4', 'KIVI', 38.0, -0.05),
            _row('KIVI_INT2', 'KIVI', 20.0, -0.5),
            _row('FLOWCACHE_HYBRID_INT2', 'FLOWCACHE', 45.0, -0.2),     # INT2, no INT4 twin
            # mixed: would move both means if it were counted
            _row('SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT2', 'SPATIAL_MIXED', 1000.0, -0.01),
            _row('FLOWCACHE_SOFT_PRUNE_INT4', 'FLOWCACHE', 50.0, -0.02, ratio=5.1, passed=2),
            dict(method='QAQ_INT2', family='QAQ', finite=False, ratio=4.0, study_ratio=4.0)]
    text = '\n'.join(bw.orderings(rows))
    int2 = np.mean([30.0, 20.0, 45.0])
    int4 = np.mean([40.0, 38.0, 50.0])
    assert f'{int2:.2f} dB over 3 INT2 rows, {int4:.2f} dB over 3 INT4 rows' in text
    assert f'INT2 - INT4 = {int2 - int4:+.2f} dB' in text
    assert 'INT2 below INT4 in 2 of 2 pairs' in text
    # soft prune: the second best of the 7 finite methods (the mixed row's 1000 dB is first)
    assert 'FLOWCACHE_SOFT_PRUNE_INT4: ratio 5.10x' in text and 'rank 2 of 7' in text
    assert 'checks passed 2 (BF16 3)' in text
    med = np.median([-0.1, -0.3, -0.05, -0.5, -0.2, -0.01, -0.02])
    assert f'median PSNR slope over 7 methods {med:+.3f}' in text
    # KIVI_INT2 (-0.5) is steeper than the median (-0.1); KIVI_INT4 (-0.05) is not
    assert 'than the median: 1 of 2' in text

  def test_missing_groups_say_so(self):
    text = '\n'.join(bw.orderings([_row('BF16', 'BF16', 100.0, 0.0)]))
    assert 'lacks INT2 or INT4' in text and 'no SOFT_PRUNE' in text and 'no KIVI/QuaRot' in text


def test_end_to_end_reference_once(tmp_path, monkeypatch):
  """Two blocks of `world`, BF16 and RTN_INT2, one timing rerun: 4 rollouts in all (the
  reference is not recomputed for the method), BF16 at the cap against itself."""
  calls = []
  rollout = SelfForcing.rollout

  def counting(self, *a, **kw):
    calls.append(self.method.name)
    return rollout(self, *a, **kw)

  monkeypatch.setattr(SelfForcing, 'rollout', counting)
  out, js = tmp_path / 'w.md', tmp_path / 'w.json'
  raw = bw.main(['--config=world', '--methods=rtn2', '--frames=6', '--repeats=1',
                 f'--out={out}', f'--json={js}'])
  assert calls == ['BF16', 'BF16', 'RTN_INT2', 'RTN_INT2']
  on_disk = json.loads(js.read_text())
  assert [r['method'] for r in on_disk['rows']] == ['BF16', 'RTN_INT2']
  assert on_disk['meta']['batch'] == len(bw.PROMPTS) == 3 and on_disk['meta']['frames'] == 6
  ref, rtn = raw['rows']
  assert ref['video_psnr'] == metrics.PSNR_CAP and ref['psnr_slope'] == 0.0
  assert ref['ratio'] == pytest.approx(1.0, rel=1e-3)     # BF16's ring adds a few index bytes
  assert ref['latent_rel_l2'] == 0.0 and ref['time_ratio'] == 1.0
  assert rtn['ratio'] > 4 and rtn['deterministic'] and ref['deterministic']
  assert rtn['latent_rel_l2'] > 0 and rtn['video_psnr'] < metrics.PSNR_CAP
  per = np.array(rtn['frame_psnr'])
  assert rtn['video_psnr'] == pytest.approx(per.mean()) and len(per) == 6
  assert rtn['last_window_psnr'] == pytest.approx(per.mean())   # world: the window is every frame
  for r in raw['rows']:
    assert len(r['checks']) == 3 and r['checks_passed'] == sum(c['passed'] for c in r['checks'])
  md = out.read_text()
  assert '| RTN_INT2 | RTN |' in md and 'Orderings:' in md


def test_bad_input_fails_before_any_rollout(monkeypatch, capsys):
  def fail(*a, **kw):
    raise AssertionError('a rollout ran')

  monkeypatch.setattr(SelfForcing, 'rollout', fail)
  for argv, msg in ((['--methods=rtn_int3'], 'unknown cache method'),
                    (['--frames=4'], 'not a positive multiple of the block'),
                    (['--config=tiny'], 'has no world model')):
    with pytest.raises(SystemExit):
      bw.main(argv)
    assert msg in capsys.readouterr().err
