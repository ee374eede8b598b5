"""Issue 37, 3.3: faults under `accelerate launch` with two real CPU processes.

`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` starts two ranks under
torchrun's agent. The faults are real signals sent to one rank's pid or to both. A tiny wrapper
script sleeps half a second after each checkpoint and each label shard, so that a signal sent
when one appears lands in the middle of the work and not after it; it changes nothing else.
Every launch has a hard timeout: a rank left waiting on a collective fails the test, it does not
hang it.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest

from timm_noisystudent.cli import main
from timm_noisystudent.demo import write_demo_data
from timm_noisystudent.labeling import raw_files
from timm_noisystudent.models import load_model, save_model

MODEL = 'test_efficientnet'
LAUNCH_TIMEOUT = 600  # seconds: a hang, not a slow machine, is what this catches
N_UNLABELED = 96

pytestmark = [pytest.mark.skipif(not sys.platform.startswith('linux'), reason='finds the ranks in /proc'),
              pytest.mark.filterwarnings('ignore:the confidence threshold')]

_SLOWED = '''
import sys, time
from timm_noisystudent import engine, labeling
from timm_noisystudent.cli import main

def slowed(f):
    def wrapper(*args, **kwargs):
        out = f(*args, **kwargs)
        time.sleep(0.5)
        return out
    return wrapper

engine._save_checkpoint = slowed(engine._save_checkpoint)
labeling._Shard.write = slowed(labeling._Shard.write)
sys.exit(main(sys.argv[1:]))
'''


def _env():
    from conftest import hub_env
    return hub_env(OMP_NUM_THREADS='1', ACCELERATE_USE_CPU='1')


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp('mp')
    write_demo_data(root / 'data', per_class=5, n_test=10)
    (root / 'unlabeled').mkdir()
    for f in sorted((root / 'data' / 'unlabeled').iterdir())[:N_UNLABELED]:
        shutil.copy(f, root / 'unlabeled' / f.name)
    (root / 'slowed.py').write_text(_SLOWED)
    return root


@pytest.fixture(scope='module')
def teacher(root):
    import torch
    torch.manual_seed(0)
    model = load_model(MODEL, pretrained=False, num_classes=10)
    return save_model(model, root / 'teacher', label_names=[f'digit_{i}' for i in range(10)],
                      data_config={'input_size': (3, 32, 32), 'crop_pct': 1.0, 'interpolation': 'bilinear',
                                   'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5)})


def _launch(root: Path, args) -> list:
    return [str(Path(sys.executable).with_name('accelerate')), 'launch', '--multi_gpu', '--num_processes', '2',
            '--main_process_port', '0', str(root / 'slowed.py'), *args]


def _train(root: Path, out: Path, *extra) -> list:
    # 50 images, 8 a process: 3 steps an epoch, 12 in all, a checkpoint every 2
    return ['train', '--data', str(root / 'data' / 'labeled'), '--model', MODEL, '--image-size', '32',
            '--epochs', '4', '--batch-size', '8', '--num-workers', '0', '--mixed-precision', 'no',
            '--checkpoint-every', '2', '--min-steps', '0', '--eval-data', str(root / 'data' / 'labeled'), '--no-progress',
            '--output', str(out), *extra]


def _label(root: Path, teacher: Path, out: Path) -> list:
    return ['label', '--teacher', str(teacher), '--data', str(root / 'unlabeled'), '--output', str(out),
            '--threshold', '0', '--batch-size', '4', '--rows-per-shard', '8', '--num-workers', '0',
            '--mixed-precision', 'no', '--no-progress']


def _run(cmd) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=LAUNCH_TIMEOUT)
    return proc


def _ranks(launcher: int) -> dict:
    """rank -> pid of the launcher's worker processes."""
    ranks = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            if int(Path(f'/proc/{entry}/stat').read_text().rsplit(')', 1)[1].split()[1]) != launcher:
                continue
            env = dict(kv.split('=', 1) for kv in Path(f'/proc/{entry}/environ').read_text().split('\0') if '=' in kv)
        except (OSError, ValueError, IndexError):
            continue
        if 'RANK' in env:
            ranks[int(env['RANK'])] = int(entry)
    return ranks


def _signal_when(cmd, ready, sig, ranks_to_signal) -> str:
    """Start the launch, send ``sig`` to those ranks once ``ready()`` holds; all it printed once it ended."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not ready():
            assert proc.poll() is None, 'the launch ended before the fault could be injected'
            assert time.monotonic() < deadline, 'the launch never reached the point of the fault'
            time.sleep(0.05)
        ranks = _ranks(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        for rank in ranks_to_signal:
            os.kill(ranks[rank], sig)
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail('a process of the launch hung after the fault')
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, log[-3000:]
    return log


def _checkpoints(out: Path):
    return sorted((out / 'checkpoints').glob('step-*'))


def _ours(log: str):
    """What the ranks printed as the project: its error and stop lines (torchrun's own report is apart)."""
    return [line for line in log.splitlines() if line.startswith(('error:', 'stopped by signal'))]


def _survivor_exit(log: str, rank: int) -> str:
    """The exit code torchrun's report gives for ``rank``: 2 when it stopped itself, -9 when it was killed."""
    match = re.search(rf'rank\s*: {rank} \(local_rank: {rank}\)\s*\n\s*exitcode\s*: (-?\d+)', log)
    return match.group(1) if match else 'not reported'


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def reference(root):
    """An uninterrupted two-process training run."""
    out = root / 'reference'
    proc = _run(_launch(root, _train(root, out)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _assert_same_as(reference: Path, out: Path) -> None:
    assert _digest(out / 'model' / 'model.safetensors') == _digest(reference / 'model' / 'model.safetensors')
    ref, got = (json.loads((d / 'metrics.json').read_text()) for d in (reference, out))
    assert got['step'] == ref['step'] == 12 and got['top1'] is not None and got['top1'] == ref['top1']


def test_one_rank_killed_in_training_stops_the_other_with_one_line(root):
    out = root / 'killed'
    cmd = _launch(root, _train(root, out))
    log = _signal_when(cmd, lambda: _checkpoints(out), signal.SIGKILL, [1])
    ours = _ours(log)
    assert len(ours) == 1 and ours[0].startswith('error: process 1 of 2 is gone'), log[-4000:]
    assert 'run the same command again to resume' in ours[0]
    assert '[rank0]: Traceback' not in log  # the survivor printed its line, not a gloo traceback
    assert _survivor_exit(log, 0) == '2', log[-3000:]  # it ended itself, not killed by the launcher
    assert not (out / 'model').exists() and (_checkpoints(out)[-1] / 'trainer_state.json').is_file()


def test_after_one_rank_was_killed_the_rerun_ends_identical(root, reference):
    out = root / 'killed'
    if not _checkpoints(out):
        test_one_rank_killed_in_training_stops_the_other_with_one_line(root)
    rerun = _run(_launch(root, _train(root, out, '--resume')))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert 'resuming from' in rerun.stdout
    _assert_same_as(reference, out)


def test_both_ranks_sigtermed_together_resume_bit_identical(root, reference):
    out = root / 'terminated'
    cmd = _launch(root, _train(root, out))
    log = _signal_when(cmd, lambda: _checkpoints(out), signal.SIGTERM, [0, 1])
    ours = _ours(log)
    assert len(ours) == 1, log[-4000:]  # the main process says it, once
    match = re.fullmatch(r'stopped by signal 15 at step (\d+); checkpoint saved in (.+?)\. Run the same command again with '
                         r'--resume to continue\.', ours[0])
    assert match and Path(match.group(2)) == out / 'checkpoints', ours
    assert _checkpoints(out)[-1].name == f'step-{int(match.group(1)):08d}'

    rerun = _run(_launch(root, _train(root, out, '--resume')))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f'resuming from {_checkpoints(out)[0].parent}' in rerun.stdout
    _assert_same_as(reference, out)


def _rows(out: Path, which: str = 'data') -> datasets.Dataset:
    files = sorted(str(p) for p in (out / which).glob('*.parquet'))
    return datasets.load_dataset('parquet', data_files=files, split='train').sort('index')


def test_main_rank_killed_mid_labeling_the_other_names_it_and_the_rerun_labels_every_row_once(
        root, teacher, tmp_path, capsys):
    out = tmp_path / 'labels'
    log = _signal_when(_launch(root, _label(root, teacher, out)), lambda: len(raw_files(out)) >= 2,
                       signal.SIGKILL, [0])
    ours = _ours(log)
    assert len(ours) == 1 and ours[0].startswith('error: process 0 of 2 is gone'), log[-4000:]
    assert '[rank1]: Traceback' not in log
    assert _survivor_exit(log, 1) == '2', log[-3000:]
    kept = raw_files(out)
    assert 2 <= len(kept) < N_UNLABELED // 8 and not (out / 'stats.json').exists()

    capsys.readouterr()
    assert main(_label(root, teacher, out)) == 0  # the rerun, in one process: shards are ranges of rows
    stats = json.loads((out / 'stats.json').read_text())
    assert stats['rows_resumed'] == 8 * len(kept) > 0
    raw = _rows(out, 'raw')
    assert raw['index'] == list(range(N_UNLABELED))  # every row labeled once: none lost, none twice

    assert main(_label(root, teacher, tmp_path / 'uninterrupted')) == 0
    ref = _rows(tmp_path / 'uninterrupted', 'raw')
    assert raw['label'] == ref['label']
    np.testing.assert_allclose(np.asarray(raw['probs']), np.asarray(ref['probs']), atol=1e-5)
    assert _rows(out)['index'] == _rows(tmp_path / 'uninterrupted')['index']
