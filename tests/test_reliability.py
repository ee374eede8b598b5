"""Issue 8: crash safety, hostile inputs, clear errors and security. Each test injects one fault.

Runs are tiny (timm's test_efficientnet on scikit-learn digits at 32 px) and every subprocess
uses one thread. Faults are real where the test can make them real: SIGKILL/SIGTERM/SIGINT to a
running `noisystudent` process, files that are not images, a PNG whose header declares 400
megapixels, a pickle that would run a shell command. Two are simulated, as each test says: a full
disk (a file-size rlimit makes the kernel fail the write) and a read-only output directory (a
path under a regular file, since the tests run as root and chmod does not stop root).
"""
import ast
import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

import timm_noisystudent
from digits import digits_arrays, write_image_folder, write_parquet
from timm_noisystudent.cli import main
from timm_noisystudent.data import decode_image
from timm_noisystudent.models import load_model, save_model
from timm_noisystudent.demo import write_demo_data
from timm_noisystudent.pipeline import _warn_small_student

CLI = [sys.executable, '-m', 'timm_noisystudent']
MODEL = 'test_efficientnet'
STAGES = ['iter0-teacher', 'iter1-labels', 'iter1-student']
ROWS_PER_SHARD = 128  # labels.batch_size 4 -> 32 batches per shard
LEFTOVER = re.compile(r'^\..+\.(tmp|old)([-.].*)?$')  # every writer's hidden temp name

# labeling a handful of images keeps fewer than a batch: its advice to lower the threshold is noise here
pytestmark = pytest.mark.filterwarnings('ignore:the confidence threshold')


def _env(**extra):
    from conftest import hub_env
    return hub_env(OMP_NUM_THREADS='1', **extra)


@contextlib.contextmanager
def _one_thread():
    # the reference runs in this process; the runs it is compared with run in subprocesses
    # with OMP_NUM_THREADS=1, and a different thread count may sum floats in another order
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('reliability') / 'data'
    write_demo_data(root, per_class=5, n_test=50)
    return root


def _config(root: Path, out: Path) -> dict:
    """Teacher 24 steps, labeling 5 shards of 128 images, student 40 steps; a checkpoint every 2 steps."""
    return {
        'labeled': str(root / 'labeled'),
        'unlabeled': {'path': str(root / 'unlabeled'), 'split': 'train[:640]'},
        'eval': str(root / 'test'),
        'teacher': {'model': MODEL, 'epochs': 4, 'image_size': 32},
        'students': [{'model': MODEL, 'epochs': 1}],
        'labels': {'threshold': 0.0, 'batch_size': 4, 'mixed_precision': 'no'},
        'noise': {'randaugment': 'tf-m5-n2', 'dropout': 0.2, 'drop_path': 0.1},
        'train': {'batch_size': 8, 'unlabeled_ratio': 2, 'num_workers': 0, 'mixed_precision': 'no',
                  'checkpoint_every': 2, 'min_steps': 0},
        'output': str(out),
    }


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope='module')
def reference(data_root, tmp_path_factory):
    """An uninterrupted run that pushes its final model to the local Hub; everything it printed or logged."""
    from conftest import _HUB
    root = tmp_path_factory.mktemp('reference')
    out = root / 'run'
    cfg = dict(_config(data_root, out), hub={'repo_id': _HUB.unique_repo_id('reliability')})
    config_file = _write_config(root / 'config.yaml', cfg)
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    hub_logger = logging.getLogger('huggingface_hub')
    old_level = hub_logger.level
    hub_logger.addHandler(handler)
    hub_logger.setLevel(logging.DEBUG)
    try:
        with _one_thread(), contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            code = main(['run', str(config_file), '--no-progress'])
    finally:
        hub_logger.removeHandler(handler)
        hub_logger.setLevel(old_level)
    assert code == 0, captured.getvalue()[-3000:]
    return {'out': out, 'output': captured.getvalue(), 'repo_id': cfg['hub']['repo_id']}


def _latest_step(stage_dir: Path) -> int:
    steps = [int(p.name.split('-')[1]) for p in (stage_dir / 'checkpoints').glob('step-*')]
    return max(steps, default=0)


def _shards(labels_dir: Path):
    return sorted((labels_dir / 'raw').glob('rows-*.parquet'))


def _leftovers(root: Path):
    return [p for p in root.rglob('*') if LEFTOVER.match(p.name)]


def _interrupt(cmd, ready, log_path: Path, sig=signal.SIGKILL, timeout=300):
    """Start ``cmd``, send ``sig`` as soon as ``ready()`` holds, wait; the exit code and all it printed."""
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
        deadline = time.time() + timeout
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f'it ended before the fault:\n{log_path.read_text()[-3000:]}'
        proc.send_signal(sig)
        code = proc.wait(timeout=300)
    return code, log_path.read_text()


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


def _selected_labels(labels_dir: Path):
    files = sorted(str(p) for p in (labels_dir / 'data').glob('*.parquet'))
    return datasets.load_dataset('parquet', data_files=files, split='train').to_dict()


def _assert_same_labels(a: Path, b: Path) -> None:
    la, lb = _selected_labels(a), _selected_labels(b)
    assert la['index'] == lb['index'] and la['label'] == lb['label']
    np.testing.assert_allclose(np.asarray(la['probs']), np.asarray(lb['probs']), rtol=1e-5, atol=1e-7)


def _history(stage_dir: Path) -> list:
    """metrics.jsonl without the timings: one line per epoch, each once, however often it was resumed."""
    rows = [json.loads(line) for line in (stage_dir / 'metrics.jsonl').read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != 'seconds'} for row in rows]


def _error_line(err: str) -> str:
    """The one line a user error prints; nothing else on stderr may look like an error."""
    lines = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(lines) == 1, err[-3000:]
    assert 'Traceback' not in err
    return lines[0]


# --- crash safety: killed and preempted runs ------------------------------------------------------

def test_sigkill_during_each_stage_then_rerun_gives_the_uninterrupted_result(data_root, reference, tmp_path):
    out = tmp_path / 'run'
    cmd = CLI + ['run', str(_write_config(tmp_path / 'config.yaml', _config(data_root, out))), '--no-progress']
    teacher, labels, student = (out / s for s in STAGES)

    # 1. SIGKILL during teacher training, once it has a mid-stage checkpoint
    _interrupt(cmd, lambda: _latest_step(teacher) >= 4, tmp_path / 'kill1.log')
    assert not (teacher / 'DONE').exists() and not labels.exists()

    # 2. rerun: the teacher resumes from its checkpoint; SIGKILL during labeling, after its first shard
    _, log = _interrupt(cmd, lambda: len(_shards(labels)) >= 1, tmp_path / 'kill2.log')
    assert 'resuming from' in log and 'iter0-teacher: training' in log
    assert (teacher / 'DONE').is_file() and not (labels / 'DONE').exists()
    teacher_done = (teacher / 'DONE').stat().st_mtime_ns
    shards = {p.name: p.stat().st_mtime_ns for p in _shards(labels)}
    assert 1 <= len(shards) < 5

    # 3. rerun: labeling keeps its finished shards; SIGKILL during student training
    _, log = _interrupt(cmd, lambda: _latest_step(student) >= 4, tmp_path / 'kill3.log')
    assert 'iter0-teacher: done, skipped' in log
    assert (labels / 'DONE').is_file() and not (student / 'DONE').exists()
    assert {p.name: p.stat().st_mtime_ns for p in _shards(labels) if p.name in shards} == shards
    assert json.loads((labels / 'stats.json').read_text())['rows_resumed'] == ROWS_PER_SHARD * len(shards)
    labels_done = (labels / 'DONE').stat().st_mtime_ns

    # 4. rerun to the end: finished stages skipped, the student resumed mid-stage
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'iter0-teacher: done, skipped' in proc.stdout and 'iter1-labels: done, skipped' in proc.stdout
    assert 'resuming from' in proc.stdout
    assert (teacher / 'DONE').stat().st_mtime_ns == teacher_done
    assert (labels / 'DONE').stat().st_mtime_ns == labels_done

    ref = reference['out']
    _assert_same_labels(ref / 'iter1-labels', labels)
    for stage in ('iter0-teacher', 'iter1-student'):
        _assert_same_weights(ref / stage / 'model' / 'model.safetensors', out / stage / 'model' / 'model.safetensors')
        assert _history(out / stage) == _history(ref / stage)
    _assert_same_weights(ref / 'final' / 'model.safetensors', out / 'final' / 'model.safetensors')
    assert _leftovers(out) == []


def test_sigint_and_sigterm_stop_run_cleanly_and_the_rerun_resumes(data_root, reference, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(reference['out'] / 'iter0-teacher', out / 'iter0-teacher')  # a finished teacher
    cmd = CLI + ['run', str(_write_config(tmp_path / 'config.yaml', _config(data_root, out))), '--no-progress']
    labels, student = out / 'iter1-labels', out / 'iter1-student'

    # SIGINT (Ctrl-C) during labeling: it stops at the next batch and drops the unfinished shard
    code, log = _interrupt(cmd, lambda: len(_shards(labels)) >= 1, tmp_path / 'int.log', sig=signal.SIGINT)
    assert code == 130, log[-3000:]
    assert log.strip().splitlines()[-1] == (
        f'iter1-labels: stopped by signal 2 while labeling; the finished shards in {labels / "raw"} are kept. '
        'Run the same command again to resume; finished stages are skipped.')
    assert not (labels / 'stats.json').exists() and not (labels / 'DONE').exists()
    assert _leftovers(out) == []  # the unfinished shard was dropped, not half-written
    kept = len(_shards(labels))

    # rerun; SIGTERM (preemption) during student training: a checkpoint at the next step, exit 143
    code, log = _interrupt(cmd, lambda: _latest_step(student) >= 2, tmp_path / 'term.log', sig=signal.SIGTERM)
    assert code == 143, log[-3000:]
    match = re.fullmatch(r'iter1-student: stopped by signal 15 at step (\d+); checkpoint saved in (.+)\. '
                         r'Run the same command again to resume; finished stages are skipped\.',
                         log.strip().splitlines()[-1])
    assert match and match.group(2) == str(student / 'checkpoints'), log[-2000:]
    assert _latest_step(student) == int(match.group(1)) and not (student / 'DONE').exists()
    assert json.loads((labels / 'stats.json').read_text())['rows_resumed'] == ROWS_PER_SHARD * kept

    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'resuming from {student / "checkpoints" / f"step-{int(match.group(1)):08d}"}' in proc.stdout
    _assert_same_labels(reference['out'] / 'iter1-labels', labels)
    _assert_same_weights(reference['out'] / 'final' / 'model.safetensors', out / 'final' / 'model.safetensors')
    assert _history(student) == _history(reference['out'] / 'iter1-student')
    assert _leftovers(out) == []


def _train_args(data: Path, out: Path, *extra) -> list:
    return ['train', '--data', str(data), '--model', MODEL, '--image-size', '32', '--epochs', '4',
            '--batch-size', '8', '--num-workers', '0', '--mixed-precision', 'no', '--checkpoint-every', '2',
            '--min-steps', '0', '--output', str(out), *extra]


def test_sigterm_during_train_saves_a_checkpoint_and_exits_143(data_root, tmp_path, capsys):
    out = tmp_path / 'teacher'
    args = _train_args(data_root / 'labeled', out)
    code, log = _interrupt(CLI + args, lambda: _latest_step(out) >= 2, tmp_path / 'term.log', sig=signal.SIGTERM)
    assert code == 143, log[-3000:]
    last = log.strip().splitlines()[-1]
    match = re.fullmatch(r'stopped by signal 15 at step (\d+); checkpoint saved in (.+)\. '
                         r'Run the same command again with --resume to continue\.', last)
    assert match, last
    step = int(match.group(1))
    assert match.group(2) == str(out / 'checkpoints') and _latest_step(out) == step
    assert (out / 'checkpoints' / f'step-{step:08d}' / 'trainer_state.json').is_file()
    assert not (out / 'model').exists() and _leftovers(out) == []

    assert main(args + ['--resume']) == 0
    assert f'resuming from {out / "checkpoints" / f"step-{step:08d}"}' in capsys.readouterr().out
    assert json.loads((out / 'metrics.json').read_text())['step'] == 24
    assert [row['epoch'] for row in _history(out)] == [1, 2, 3, 4]


_TWO_PROCESSES = """
import os, signal, sys, threading, time
from pathlib import Path
from accelerate import debug_launcher

def fn(data, out):
    from timm_noisystudent.config import ModelStage, TrainConfig
    from timm_noisystudent.engine import train
    from timm_noisystudent.runtime import Preempted, process_state
    rank = process_state().process_index
    if rank == 0:  # only this process is signalled, as a preemption agent may do
        def fire():
            while not list((out / 'checkpoints').glob('step-*')):
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=fire, daemon=True).start()
    try:
        train(ModelStage(model='test_efficientnet', epochs=50, image_size=32), data, out, progress=False,
              train_cfg=TrainConfig(batch_size=4, num_workers=0, mixed_precision='no', checkpoint_every=2,
                                    min_steps=0))
        result = 'finished'
    except Preempted as e:
        result = str(e)
    (out / f'rank{rank}.txt').write_text(result)

debug_launcher(fn, args=(sys.argv[1], Path(sys.argv[2])), num_processes=2)
"""


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(data_root, tmp_path):
    # Without agreeing on the signal, the signalled process would wait in the checkpoint barrier while
    # the other waited in the next gradient all-reduce: a hang (this test then times out).
    out = tmp_path / 'ddp'
    script = tmp_path / 'two_processes.py'
    script.write_text(_TWO_PROCESSES)
    proc = subprocess.Popen([sys.executable, str(script), str(data_root / 'labeled'), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail('the two processes hung after one of them was signalled')
    assert proc.returncode == 0, log[-3000:]
    results = [(out / f'rank{r}.txt').read_text() for r in (0, 1)]
    assert results[0] == results[1], results
    match = re.fullmatch(r'stopped by signal 15 at step (\d+); checkpoint saved in .+\.', results[0])
    assert match and _latest_step(out) == int(match.group(1)), results


# --- crash safety: a full disk and an unwritable output directory ---------------------------------

@contextlib.contextmanager
def _file_size_limit(nbytes: int):
    """Simulated full disk: the kernel refuses to grow any file past ``nbytes`` (EFBIG, not ENOSPC).

    Python ignores SIGXFSZ, so the write fails with an OSError instead of killing the process. Only
    the soft limit is lowered, so it can be raised back. Nothing is monkeypatched: every writer
    (Python, safetensors, torch, pyarrow) meets the failure at the write call itself.
    """
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _digests(directory: Path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


def test_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_last_good_one(data_root, tmp_path, capsys):
    out = tmp_path / 'teacher'
    args = _train_args(data_root / 'labeled', out)
    assert main(args + ['--max-steps', '4']) == 0
    good = out / 'checkpoints' / 'step-00000004'
    before = _digests(good)
    capsys.readouterr()

    with _file_size_limit(300_000):  # below one checkpoint file (~425 KB of weights)
        code = main(args + ['--resume', '--max-steps', '8'])
    err = capsys.readouterr().err
    assert code == 2
    line = _error_line(err)
    assert line.startswith(f'error: cannot write a checkpoint in {out / "checkpoints"} (')
    assert 'File too large' in line and 'the last good checkpoint is kept' in line
    assert _latest_step(out) == 4 and _digests(good) == before
    assert _leftovers(out) == []

    assert main(args + ['--resume', '--max-steps', '8']) == 0
    assert f'resuming from {good}' in capsys.readouterr().out
    assert json.loads((out / 'metrics.json').read_text())['step'] == 8


@pytest.fixture(scope='module')
def two_class_model(tmp_path_factory):
    torch.manual_seed(0)
    model = load_model(MODEL, pretrained=False, num_classes=2)
    return save_model(model, tmp_path_factory.mktemp('model') / 'model', label_names=['digit_0', 'digit_1'],
                      data_config={'input_size': (3, 32, 32), 'crop_pct': 1.0, 'interpolation': 'bilinear',
                                   'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5)})


def test_disk_full_while_writing_labels_or_an_export_is_one_line(data_root, two_class_model, tmp_path, capsys):
    images, labels, export = str(data_root / 'test'), tmp_path / 'labels', tmp_path / 'export'
    label_argv = ['label', '--teacher', str(two_class_model), '--data', images, '--output', str(labels),
                  '--num-workers', '0', '--mixed-precision', 'no']
    datasets.load_dataset(images, split='train')  # its cache is built before the disk "fills up"
    assert main(['export', str(two_class_model), str(export)]) == 0
    exported = _digests(export)
    capsys.readouterr()
    with _file_size_limit(2_000):  # above raw/manifest.json, below a raw shard of 50 rows and any model
        label_code = main(label_argv)
        label_err = capsys.readouterr().err
        export_code = main(['export', str(two_class_model), str(export)])
        export_err = capsys.readouterr().err
    for code, err in ((label_code, label_err), (export_code, export_err)):
        assert code == 2
        line = _error_line(err)
        assert 'File too large' in line and 'then run the same command again; finished work is kept' in line
    assert not list((labels / 'raw').glob('*.parquet')) and not (labels / 'stats.json').exists()
    assert _digests(export) == exported  # the earlier export is intact
    assert _leftovers(tmp_path) == []
    assert main(label_argv) == 0


@pytest.mark.parametrize('command', ['train', 'label', 'run', 'export'])
def test_output_that_cannot_be_a_directory_is_one_line(command, data_root, two_class_model, tmp_path, capsys):
    # Simulated read-only output: as root, chmod would not stop a write, so the output path lies under a
    # regular file. Creating it fails in the kernel at the call a read-only mount would fail, with ENOTDIR
    # (EEXIST for export's mkdir) instead of EROFS/EACCES; those take the same CLI path with another hint.
    blocker = tmp_path / 'a-file'
    blocker.write_text('not a directory')
    out = blocker / 'out'
    argv = {
        'train': _train_args(data_root / 'labeled', out),
        'label': ['label', '--teacher', str(two_class_model), '--data', str(data_root / 'test'),
                  '--output', str(out), '--num-workers', '0'],
        'run': ['run', str(_write_config(tmp_path / 'config.yaml', _config(data_root, out)))],
        'export': ['export', str(two_class_model), str(out)],
    }[command]
    assert main(argv) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(blocker) in line and 'a file stands where a directory should be' in line  # ENOTDIR or EEXIST


# --- hostile and odd images -----------------------------------------------------------------------

def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, 'PNG')
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A valid 1x1 PNG whose header says 20000 x 20000: PIL refuses it before decoding anything."""
    data = bytearray(_png(Image.new('L', (1, 1))))
    struct.pack_into('>II', data, 16, 20000, 20000)  # IHDR width and height
    struct.pack_into('>I', data, 29, zlib.crc32(bytes(data[12:29])))  # a correct CRC: only the size is hostile
    return bytes(data)


def _digit(i: int = 0) -> Image.Image:
    return Image.fromarray(_digits()[0][i])


@functools.lru_cache(maxsize=None)
def _digits():
    return digits_arrays(32)


@functools.lru_cache(maxsize=None)
def _hostile_files():
    """file name -> bytes, for every unreadable kind of file."""
    jpeg = io.BytesIO()
    _digit().save(jpeg, 'JPEG')
    png = _png(_digit())
    corrupt = bytearray(png)
    corrupt[60:] = bytes(len(corrupt) - 60)  # a valid header, then zeros where the pixel data was
    assert 20000 * 20000 > 2 * Image.MAX_IMAGE_PIXELS
    return {
        'truncated.jpg': jpeg.getvalue()[:len(jpeg.getvalue()) // 2],
        'truncated.png': png[:len(png) // 2],
        'corrupt.png': bytes(corrupt),
        'zero.png': b'',
        'text.jpg': b'this is a text file, not a JPEG\n',
        'bomb.png': _bomb_png(),
    }


def _odd_images():
    """file name -> an image in a mode or size that must decode to RGB."""
    sixteen = Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16))
    palette = Image.new('P', (20, 20), 3)
    palette.info['transparency'] = 3
    return {
        'one-pixel.png': Image.new('RGB', (1, 1), (1, 2, 3)),
        'gray.png': Image.new('L', (20, 20), 100),
        'rgba.png': Image.new('RGBA', (20, 20), (10, 20, 30, 0)),
        'palette.png': Image.new('P', (20, 20), 3),
        'palette-transparent.png': palette,
        'cmyk.jpg': Image.new('CMYK', (20, 20), (0, 50, 100, 0)),
        'sixteen-bit.png': sixteen,
    }


@pytest.mark.parametrize('name', sorted(_hostile_files()))
def test_unreadable_image_is_skipped_not_fatal(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(_hostile_files()[name])
    assert decode_image({'path': str(path), 'bytes': None}) is None
    assert decode_image({'path': None, 'bytes': path.read_bytes()}) is None


def test_the_decompression_bomb_guard_stays_on():
    # the plugin may silence the warning for big images, never lift PIL's limit
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS <= 89478485
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(_bomb_png()))


@pytest.mark.parametrize('name', sorted(_odd_images()))
def test_odd_image_decodes_to_rgb(name, tmp_path):
    img = _odd_images()[name]
    path = tmp_path / name
    img.save(path)
    out = decode_image({'path': str(path), 'bytes': None})
    assert out.mode == 'RGB' and out.size == img.size


@pytest.fixture(scope='module')
def hostile_folder(tmp_path_factory):
    """Two class folders of good digits, each with every hostile and odd file mixed in."""
    root = tmp_path_factory.mktemp('hostile') / 'images'
    x, y = _digits()
    keep = np.flatnonzero(y < 2)[:16]
    write_image_folder(root, x[keep], y[keep])
    for folder in ('digit_0', 'digit_1'):
        for name, data in _hostile_files().items():
            (root / folder / f'bad-{name}').write_bytes(data)
        for name, img in _odd_images().items():
            img.save(root / folder / f'odd-{name}')
    return root


def test_hostile_images_are_skipped_counted_and_listed(hostile_folder, two_class_model, tmp_path, capsys):
    bad = 2 * len(_hostile_files())
    decodable = 16 + 2 * len(_odd_images())
    assert main(['eval', '--model', str(two_class_model), '--data', str(hostile_folder), '--split', 'train',
                 '--json', '--num-workers', '0', '--mixed-precision', 'no', '--batch-size', '8']) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (metrics['images'], metrics['skipped']) == (decodable, bad)

    out = tmp_path / 'labels'
    assert main(['label', '--teacher', str(two_class_model), '--data', str(hostile_folder), '--output', str(out),
                 '--threshold', '0', '--num-workers', '0', '--mixed-precision', 'no', '--batch-size', '8']) == 0
    assert f'({bad} undecodable' in capsys.readouterr().out
    stats = json.loads((out / 'stats.json').read_text())
    assert (stats['rows_labeled'], stats['failed_count']) == (decodable, bad)
    ds = datasets.load_dataset(str(hostile_folder), split='train').cast_column('image', datasets.Image(decode=False))
    names = [Path(v['path']).name for v in ds['image']]
    assert sorted(names[i] for i in stats['failed_images']) == sorted(
        f'bad-{n}' for n in _hostile_files() for _ in range(2))


# --- data errors: one line, exit code 2, through the CLI ------------------------------------------

@pytest.fixture(scope='module')
def bad_data(tmp_path_factory):
    root = tmp_path_factory.mktemp('bad-data')
    x, y = _digits()
    images = [Image.fromarray(x[i]) for i in range(4)]

    def parquet(name, labels, feature):
        ds = datasets.Dataset.from_dict({'image': images[:len(labels)], 'label': labels},
                                        features=datasets.Features({'image': datasets.Image(), 'label': feature}))
        (root / name).mkdir()
        ds.to_parquet(str(root / name / 'train.parquet'))
        return root / name

    corrupt_only = root / 'corrupt-only'
    corrupt_only.mkdir()
    for name, data in _hostile_files().items():
        (corrupt_only / name).write_bytes(data)
    pseudo = root / 'pseudo-10-classes'  # what `label` writes, from a 10-class teacher
    (pseudo / 'data').mkdir(parents=True)
    probs = np.full((4, 10), 0.1, np.float32)
    datasets.Dataset.from_dict({'index': list(range(4)), 'probs': probs.tolist(), 'label': [0] * 4,
                                'confidence': [0.1] * 4}).to_parquet(str(pseudo / 'data' / 'part.parquet'))
    (pseudo / 'stats.json').write_text(json.dumps({'num_classes': 10, 'soft': True, 'source': {}}))
    first = np.flatnonzero(y < 2)[:6]
    two_classes = write_image_folder(root / 'two-classes', x[first], y[first])
    return {
        'labeled': write_parquet(root / 'labeled', x[:20], y[:20]),
        'negative': parquet('negative', [0, -1, 1], datasets.Value('int64')),
        'too-big': parquet('too-big', [0, 5, 1], datasets.Value('int64')),
        'strings': parquet('strings', ['cat', 'dog'], datasets.Value('string')),
        'empty': parquet('empty', [], datasets.ClassLabel(names=['a', 'b'])),
        'corrupt-only': corrupt_only,
        'pseudo': pseudo,
        'two-classes': two_classes,
    }


DATA_ERRORS = {
    'missing image column': (['train', '--data', '{labeled}', '--image-column', 'img'],
                             "image column 'img' not found; the columns are: image, label"),
    'missing label column': (['train', '--data', '{labeled}', '--label-column', 'target'],
                             "label column 'target' not found; the columns are: image, label"),
    'negative labels': (['train', '--data', '{negative}'], "labeled labels must be in [0, 1], found -1..1"),
    'labels out of range': (['eval', '--model', '{model}', '--data', '{too-big}', '--split', 'train'],
                            "eval labels must be in [0, 1], found 0..5"),
    'string labels without ClassLabel': (['train', '--data', '{strings}'], "label column 'label' holds strings"),
    'empty labeled set': (['train', '--data', '{empty}'], "split 'train' of {empty} holds no rows"),
    'empty unlabeled set': (['label', '--teacher', '{model}', '--data', '{empty}'],
                            "split 'train' of {empty} holds no rows"),
    'only corrupt unlabeled images': (['label', '--teacher', '{model}', '--data', '{corrupt-only}'],
                                      'none of the 6 unlabeled images could be decoded'),
    'teacher classes differ from the data': (
        ['train', '--data', '{two-classes}', '--pseudo', '{pseudo}', '--unlabeled-data', '{two-classes}'],
        'the pseudo labels have 10 classes but the labeled set has 2'),
    'model classes differ from the eval data': (['eval', '--model', '{model}', '--data', '{labeled}', '--split',
                                                 'train'], 'the eval data has 10 classes'),
    'nonexistent local path': (['train', '--data', '{missing}'], 'data path {missing} does not exist'),
    'unknown Hub dataset': (['train', '--data', 'no-such-org/no-such-dataset'],
                            "cannot load dataset 'no-such-org/no-such-dataset'"),
}


@pytest.mark.parametrize('case', sorted(DATA_ERRORS))
def test_data_error_is_one_line_with_exit_code_2(case, bad_data, two_class_model, tmp_path, capsys):
    argv, expected = DATA_ERRORS[case]
    paths = {k: str(v) for k, v in bad_data.items()}
    paths.update(model=str(two_class_model), missing=str(tmp_path / 'missing'))
    argv = [a.format(**paths) for a in argv]
    common = ['--num-workers', '0', '--mixed-precision', 'no']
    if argv[0] == 'train':
        argv += ['--model', MODEL, '--image-size', '32', '--epochs', '1', '--output', str(tmp_path / 'out')]
    if argv[0] == 'label':
        argv += ['--output', str(tmp_path / 'out')]
    assert main(argv + common) == 2
    assert expected.format(**paths) in _error_line(capsys.readouterr().err)


def test_unknown_hub_dataset_offline_says_what_to_set(tmp_path):
    # huggingface_hub and datasets read the offline switch at import: a fresh process is the real thing
    argv = CLI + ['train', '--data', 'no-such-org/no-such-dataset', '--model', MODEL, '--output', str(tmp_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=_env(HF_HUB_OFFLINE='1'), timeout=300)
    assert proc.returncode == 2
    assert _error_line(proc.stderr) == (
        "error: dataset 'no-such-org/no-such-dataset' is not in the local cache and offline mode is on "
        '(HF_HUB_OFFLINE or HF_DATASETS_OFFLINE); download it once online, point HF_HOME (or HF_DATASETS_CACHE) '
        'at a cache that holds it, or pass a local folder.')


# --- config errors: caught before anything is trained or written ---------------------------------

CONFIG_ERRORS = {
    'unknown key': ('teacher.epoch=3', "unknown config key 'teacher.epoch'; did you mean 'teacher.epochs'?"),
    'wrong type': ('train.batch_size=many', "train.batch_size must be an integer, got 'many'"),
    'negative epochs': ('teacher.epochs=-1', 'teacher.epochs must be at least 1, got -1'),
    'negative batch size': ('train.batch_size=-8', 'train.batch_size must be at least 1, got -8'),
    'threshold above 1': ('labels.threshold=1.5', 'labels.threshold must be between 0 and 1, got 1.5'),
    'threshold below 0': ('labels.threshold=-0.1', 'labels.threshold must be between 0 and 1, got -0.1'),
    'per_class of 0': ('labels.per_class=0', "labels.per_class must be 'auto', 'none' or a positive integer, got 0"),
    'bad noise spec': ('noise.randaugment=rand-q9', "noise.randaugment: bad timm RandAugment noise spec 'rand-q9'"),
    'bad student noise spec': ('students.0.randaugment=tf-m99-n2', "students.0.randaugment: noise spec 'tf-m99-n2'"),
    'bad hub repo id': ('hub.repo_id=not a/valid//id', "hub.repo_id: invalid repo id 'not a/valid//id'"),
}


@pytest.mark.parametrize('case', sorted(CONFIG_ERRORS))
def test_config_error_names_the_key_before_anything_runs(case, data_root, tmp_path, capsys, hub_server):
    override, expected = CONFIG_ERRORS[case]
    out = tmp_path / 'run'
    config_file = _write_config(tmp_path / 'config.yaml', _config(data_root, out))
    assert main(['run', str(config_file), override]) == 2
    assert expected in _error_line(capsys.readouterr().err)
    assert not out.exists() and hub_server.requests == []


def test_a_student_smaller_than_its_teacher_is_allowed_with_a_warning():
    warning = _warn_small_student('tf_efficientnet_b3', 'tf_efficientnet_b0')
    assert warning == ('student tf_efficientnet_b0 is smaller than its teacher tf_efficientnet_b3; the paper uses '
                       'equal or larger students.')
    assert _warn_small_student('tf_efficientnet_b0', 'tf_efficientnet_b3') is None
    assert _warn_small_student(MODEL, MODEL) is None


# --- models ---------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def weights(tmp_path_factory, two_class_model):
    """A 1000-class state dict as safetensors and as a pickle; a model directory with only a pickle;
    and a pickle that runs a shell command if anything unpickles it without weights_only."""
    root = tmp_path_factory.mktemp('weights')
    torch.manual_seed(1)
    state = load_model(MODEL, pretrained=False).state_dict()
    save_file(state, str(root / 'weights.safetensors'))
    torch.save(state, root / 'weights.pth')
    pickled_dir = root / 'pickled-model'
    pickled_dir.mkdir()
    shutil.copy(two_class_model / 'config.json', pickled_dir / 'config.json')
    two_class_state = load_file(str(two_class_model / 'model.safetensors'))
    torch.save({'state_dict': two_class_state, 'epoch': 3}, pickled_dir / 'pytorch_model.bin')
    marker = root / 'payload-ran'

    class Payload:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)

    torch.save({'state_dict': state, 'extra': Payload()}, root / 'evil.pth')
    image = root / 'digit.png'
    _digit().save(image)
    return {'safetensors': root / 'weights.safetensors', 'pth': root / 'weights.pth', 'dir': pickled_dir,
            'evil': root / 'evil.pth', 'marker': marker, 'image': image, 'two_class': two_class_state}


def _predict(capsys, *argv) -> list:
    assert main(['predict', *argv, '--json']) == 0
    return json.loads(capsys.readouterr().out)


def test_unknown_timm_name_suggests_close_names(weights, capsys):
    assert main(['predict', str(weights['image']), '--model', 'tf_efficientnet_b0_nss']) == 2
    assert "unknown model 'tf_efficientnet_b0_nss'. Did you mean: " in _error_line(capsys.readouterr().err)


def test_safetensors_with_wrong_shapes_name_the_keys(weights, two_class_model, capsys):
    assert main(['predict', str(weights['image']), '--model', MODEL, '--no-pretrained',
                 '--checkpoint', str(two_class_model / 'model.safetensors')]) == 2
    line = _error_line(capsys.readouterr().err)
    assert 'keys differ in shape' in line and 'classifier.weight (2, ' in line


def test_pickled_checkpoint_needs_allow_pickle_and_loads_tensors_only(weights, capsys):
    base = [str(weights['image']), '--model', MODEL, '--no-pretrained']
    assert main(['predict', *base, '--checkpoint', str(weights['pth'])]) == 2
    assert '--allow-pickle' in _error_line(capsys.readouterr().err)
    expected = _predict(capsys, *base, '--checkpoint', str(weights['safetensors']))
    assert _predict(capsys, *base, '--checkpoint', str(weights['pth']), '--allow-pickle') == expected
    assert main(['predict', *base, '--checkpoint', str(weights['evil']), '--allow-pickle']) == 2
    assert 'weights_only=True' in _error_line(capsys.readouterr().err)
    assert not weights['marker'].exists()  # the payload never ran


@pytest.mark.parametrize('command', ['eval', 'label', 'train', 'export'])
def test_pickled_model_directory_needs_allow_pickle(command, weights, bad_data, tmp_path, capsys):
    model, data = str(weights['dir']), str(bad_data['two-classes'])
    quick = ['--num-workers', '0', '--mixed-precision', 'no']
    argv = {
        'eval': ['eval', '--model', model, '--data', data, '--split', 'train', *quick],
        'label': ['label', '--teacher', model, '--data', data, '--output', str(tmp_path / 'labels'), *quick],
        'train': ['train', '--model', model, '--data', data, '--image-size', '32', '--max-steps', '1',
                  '--batch-size', '4', '--output', str(tmp_path / 'student'), *quick],
        'export': ['export', model, str(tmp_path / 'export')],
    }[command]
    assert main(argv) == 2
    assert '--allow-pickle' in _error_line(capsys.readouterr().err)
    assert main(argv + ['--allow-pickle']) == 0
    if command == 'export':  # converted: safetensors only, the same tensors
        assert sorted(p.name for p in (tmp_path / 'export').iterdir()) == ['README.md', 'config.json',
                                                                            'model.safetensors']
        exported = load_file(str(tmp_path / 'export' / 'model.safetensors'))
        assert exported.keys() == weights['two_class'].keys()
        assert all(torch.equal(exported[k], weights['two_class'][k]) for k in exported)


# --- security -------------------------------------------------------------------------------------

def test_the_token_is_never_printed_logged_or_written(reference, hub_server, tmp_path, capfd, caplog):
    token = hub_server.token
    run = reference['out']
    caplog.set_level(logging.DEBUG, logger='huggingface_hub')
    assert main(['export', str(run), str(tmp_path / 'export')]) == 0
    repo_id = hub_server.unique_repo_id('security')
    assert main(['push', str(run), '--repo-id', repo_id]) == 0
    captured = capfd.readouterr()
    texts = {'run output': reference['output'], 'stdout': captured.out, 'stderr': captured.err,
             'log': caplog.text}
    files = [p for root in (run, tmp_path / 'export') for p in root.rglob('*') if p.is_file()]
    assert len(files) > 20 and any(p.name == 'config.yaml' for p in files) and any(p.name == 'README.md' for p in files)
    pushed = {**hub_server.files('model', reference['repo_id']), **hub_server.files('model', repo_id)}
    assert 'README.md' in pushed  # the token was used: both pushes reached the Hub
    assert [name for name, text in texts.items() if token in text] == []
    assert [p for p in files if token.encode() in p.read_bytes()] == []
    assert [name for name, data in pushed.items() if token.encode() in data] == []


def _calls(tree: ast.AST):
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def test_the_source_never_unpickles_without_weights_only():
    package = Path(timm_noisystudent.__file__).parent
    sources = sorted(package.rglob('*.py'))
    assert len(sources) >= 10
    torch_loads = 0
    for path in sources:
        tree = ast.parse(path.read_text(encoding='utf-8'), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] + [getattr(node, 'module', None) or '']
                unsafe = {'pickle', '_pickle', 'cPickle', 'dill', 'cloudpickle', 'joblib', 'shelve', 'marshal'}
                assert not unsafe & {m.split('.')[0] for m in modules}, f'{path}:{node.lineno} imports a pickler'
                assert not (isinstance(node, ast.ImportFrom) and node.module == 'torch'
                            and 'load' in [a.name for a in node.names]), f'{path}:{node.lineno}'
        for call in _calls(tree):
            name = ast.unparse(call.func)
            keywords = {k.arg: k.value for k in call.keywords}
            where = f'{path.name}:{call.lineno}: {ast.unparse(call)[:80]}'
            if name == 'torch.load' or name.endswith('.torch.load'):
                torch_loads += 1
                only = keywords.get('weights_only')
                assert isinstance(only, ast.Constant) and only.value is True, where
            assert not name.endswith(('read_pickle', 'pickle.load', 'pickle.loads')), where
            if name.endswith(('np.load', 'numpy.load')):
                assert not (isinstance(keywords.get('allow_pickle'), ast.Constant)
                            and keywords['allow_pickle'].value), where
    assert torch_loads >= 1  # the scan sees the one place that reads a pickle, and it is safe


def test_repo_ids_and_revisions_are_checked_before_any_request(reference, hub_server, capsys):
    # a bad hub.repo_id in a run config is caught before training (test_config_error_... above);
    # here the push commands, which would otherwise send it to the Hub
    for argv in (['push', str(reference['out']), '--repo-id', 'a/b/c'],
                 ['push', str(reference['out']), '--repo-id', 'org/ok', '--revision', 'bad..ref'],
                 ['push-labels', str(reference['out'] / 'iter1-labels'), '--repo-id', 'org/bad name']):
        assert main(argv) == 2
        assert _error_line(capsys.readouterr().err).startswith('error: invalid')
    assert hub_server.requests == []
