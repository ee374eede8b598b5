"""Issue 37, 3.1: a whole loop (teacher, labels, two students) killed at points drawn from a seed,
rerun after each kill, ends bit-identical to an uninterrupted run.

The harness is scripts/chaos.py (the same code runs at dev size with K = 20); this is its toy size:
the crash-safety tests' tiny run (tests/test_reliability.py) with a second student. Every kill is a
real signal sent from outside to the running `noisystudent run` process; see the script's docstring
for how the kill points are drawn and reached.
"""
import importlib.util
import signal
from pathlib import Path

import pytest

from test_reliability import MODEL, _config, _env, _write_config, data_root  # noqa: F401 - data_root is a fixture

ROOT = Path(__file__).resolve().parents[1]
SEED = 0


def _load_chaos():
    spec = importlib.util.spec_from_file_location('chaos', ROOT / 'scripts' / 'chaos.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()


@pytest.fixture(scope='module')
def toy(data_root, tmp_path_factory):  # noqa: F811
    """The run command, and its uninterrupted reference (shared by the tests here)."""
    root = tmp_path_factory.mktemp('chaos')
    cfg = _config(data_root, root / 'unused')
    cfg['unlabeled']['split'] = 'train[:256]'  # two raw shards of 128 rows
    cfg['students'] = [{'model': MODEL, 'epochs': 1}, {'model': MODEL, 'epochs': 1}]
    cmd = ['run', str(_write_config(root / 'config.yaml', cfg)), '--no-progress']
    reference = chaos.uninterrupted(cmd, root, env=_env(), timeout=600, say=lambda _: None)
    return {'cmd': cmd, 'reference': reference, 'work': root}


def _chaos(toy, sig, k=0, points=None):
    result = chaos.chaos(toy['cmd'], toy['work'], k, SEED, sig, env=_env(), timeout=600,
                         reference=toy['reference'], points=points, say=lambda _: None)
    assert result['failure'] is None, chaos.report(result)
    assert not [r for r in result['comparison'] if not r['same']], chaos.report(result)
    assert result['ok'], chaos.report(result)
    return result


def test_five_sigkills_spread_over_the_loop_end_bit_identical(toy):
    result = _chaos(toy, signal.SIGKILL, k=5)
    kills = result['kills']
    assert len(kills) == 5 and all(a['rc'] == -signal.SIGKILL for a in kills), chaos.report(result)
    # one kill in each of: a labeling shard, a checkpoint write, final/ or the summary, a stage's export,
    # the selection of pseudo labels
    assert sorted(a['kind'] for a in kills) == sorted(chaos.KINDS[:5]), chaos.report(result)
    assert result['attempts'][-1]['rc'] == 0
    compared = [r['what'] for r in result['comparison']]
    assert 'final/model.safetensors (sha256)' in compared
    assert {'iter1-labels', 'iter2-labels'} <= {w.split(':')[0] for w in compared if 'selected rows' in w}
    assert {'iter0-teacher', 'iter1-student', 'iter2-student'} <= {w.split(':')[0] for w in compared if 'top-1' in w}


def test_sigterms_each_leave_a_checkpoint_and_the_resumed_run_ends_bit_identical(toy):
    events = chaos.reference_writes(toy['reference'])
    drawn = chaos.draw_points(events, 1, SEED, term=True)  # a labeling shard
    # and the teacher's last checkpoint: a SIGTERM during that write was once swallowed, and the run went on
    ckpt = 'iter0-teacher/checkpoints/step-00000024'  # 24 steps: the teacher's last
    last = events.index(f'rename iter0-teacher/checkpoints/.step-00000024.tmp -> {ckpt}')
    result = _chaos(toy, signal.SIGTERM, points=drawn + [last])
    kills = result['kills']
    assert len(kills) == 2 and all(a['rc'] == 128 + signal.SIGTERM for a in kills), chaos.report(result)
    assert [a['kind'] for a in kills] == ['checkpoint', 'labeling'], chaos.report(result)
    assert chaos.STOPPED_TRAINING.match(kills[0]['last_line']).group(1, 3) == ('iter0-teacher', '24')
    assert [Path(p).name for p in kills[0]['rerun_resumed']] == ['step-00000024']
    assert chaos.STOPPED_LABELING.match(kills[1]['last_line']), kills[1]['last_line']
