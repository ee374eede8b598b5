"""A full disk (ENOSPC) or a spent quota (EDQUOT) at each write site: a raw pseudo-label shard, the
selected data, a checkpoint, a stage's final model, an export and a run's final/.

The fault is the operating system's error, raised at the lowest write call of the site (pyarrow's
parquet writer, safetensors, the file copy), the way those calls raise it on a full disk. Each test
checks one `error:` line that names the path and what to free, exit code 2, that what was whole
before is whole and nothing half-written is left (no temporaries either), and that the same command
completes once the space is back. The early warning is checked with a small `shutil.disk_usage`.
"""
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import safetensors.torch
import yaml
from safetensors import SafetensorError

from conftest import error_line, tiny_model_dir
from timm_noisystudent.cli import main
from timm_noisystudent.demo import write_demo_data

MODEL = 'test_efficientnet'
LEFTOVER = re.compile(r'^\..+\.(tmp|old)([-.].*)?$')  # every writer's hidden temporary


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('fulldisk') / 'data'
    write_demo_data(root, per_class=3, n_test=20)
    return root


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp('model') / 'model')


def _leftovers(root: Path):
    return [p for p in root.rglob('*') if LEFTOVER.match(p.name)]


def _digests(directory: Path):
    return {str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(directory.rglob('*')) if f.is_file()}


def _no_space(path, code=errno.ENOSPC):
    return OSError(code, os.strerror(code), str(path))


class _Fault:
    """Wrap ``owner.name`` so that the calls whose target path ``hits`` write half, then fail as a full disk."""

    def __init__(self, monkeypatch, owner, name, hits, error=_no_space, target=lambda a: a[1]):
        self.calls, self.real = 0, getattr(owner, name)
        self.hits, self.error, self.target = hits, error, target
        monkeypatch.setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        path = Path(os.fspath(self.target(args)))
        if not self.hits(path):
            return self.real(*args, **kwargs)
        self.calls += 1
        path.write_bytes(b'PAR1 half a file')  # what a writer left when the disk filled under it
        raise self.error(path)


def _label_args(model_dir: Path, data: Path, out: Path, *extra):
    return ['label', '--teacher', str(model_dir), '--data', str(data), '--output', str(out), '--threshold', '0',
            '--batch-size', '8', '--rows-per-shard', '8', '--num-workers', '0', '--mixed-precision', 'no',
            '--no-progress', *extra]


def _full_disk_line(err: str, path: Path) -> str:
    line = error_line(err)
    assert line.startswith(f'error: no space left on device writing {path}: free some space on '), line
    assert 'rerun the same command' in line and 'finished work is kept' in line, line
    return line


def test_a_full_disk_at_a_raw_shard_keeps_the_shards_before_it(data_root, model_dir, tmp_path, capsys,
                                                               monkeypatch):
    out = tmp_path / 'labels'
    second = out / 'raw' / 'rows-000000000008-000000000016.parquet'
    fault = _Fault(monkeypatch, pq, 'write_table', lambda p: p.name == f'.{second.name}.tmp-{os.getpid()}')
    args = _label_args(model_dir, data_root / 'labeled', out)
    assert main(args) == 2
    assert fault.calls == 1
    monkeypatch.setattr(pq, 'write_table', fault.real)
    line = _full_disk_line(capsys.readouterr().err, second)
    assert re.search(r'about [\d.,]+ [KM]iB needed', line), line
    whole = sorted(p.name for p in (out / 'raw').glob('*.parquet'))
    assert whole == ['rows-000000000000-000000000008.parquet']  # the failed shard is not there, not even half of it
    assert pq.read_table(out / 'raw' / whole[0]).num_rows == 8
    assert not (out / 'stats.json').exists() and not (out / 'data').exists()
    assert _leftovers(out) == []

    assert main(args) == 0
    stats = json.loads((out / 'stats.json').read_text())
    assert stats['rows_resumed'] == 8 and stats['rows_labeled'] == 30, stats


def test_a_full_disk_while_writing_the_selected_data_keeps_the_earlier_selection(data_root, model_dir, tmp_path,
                                                                                  capsys, monkeypatch):
    out = tmp_path / 'labels'
    assert main(_label_args(model_dir, data_root / 'labeled', out)) == 0
    before = _digests(out / 'data')
    capsys.readouterr()
    fault = _Fault(monkeypatch, pq, 'write_table', lambda p: p.parent.name.startswith('.data.tmp-'),
                   error=lambda p: _no_space(p, errno.EDQUOT))
    args = _label_args(model_dir, data_root / 'labeled', out, '--per-class', '2')
    assert main(args) == 2
    assert fault.calls == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f'error: disk quota exceeded writing {out / "data"}/rows-'), line
    assert 'or raise your quota' in line and 'rerun the same command' in line, line
    assert _digests(out / 'data') == before  # the earlier selection, whole
    assert not (out / 'stats.json').exists()  # and the directory is not taken for finished
    assert _leftovers(out) == []

    monkeypatch.setattr(pq, 'write_table', fault.real)
    assert main(args) == 0
    assert json.loads((out / 'stats.json').read_text())['per_class_target'] == 2


def _train_args(data: Path, out: Path, *extra):
    return ['train', '--data', str(data), '--model', MODEL, '--image-size', '32', '--epochs', '4',
            '--batch-size', '8', '--num-workers', '0', '--mixed-precision', 'no', '--checkpoint-every', '2',
            '--min-steps', '0', '--no-progress', '--output', str(out), *extra]


def _safetensors_full(path):
    # safetensors' own words for ENOSPC (measured on a full tmpfs): no errno, the OS error in the text
    return SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')


def test_a_full_disk_at_a_checkpoint_keeps_the_last_good_one(data_root, tmp_path, capsys, monkeypatch):
    from timm_noisystudent import engine

    out = tmp_path / 'teacher'
    args = _train_args(data_root / 'labeled', out)
    assert main(args + ['--max-steps', '2']) == 0
    good = out / 'checkpoints' / 'step-00000002'
    before = _digests(good)
    capsys.readouterr()
    fault = _Fault(monkeypatch, engine, 'save_file', lambda p: p.parent.name.endswith('.tmp'),
                   error=_safetensors_full, target=lambda a: a[1])
    assert main(args + ['--resume', '--max-steps', '4']) == 2
    assert fault.calls == 1
    line = _full_disk_line(capsys.readouterr().err, out / 'checkpoints' / 'step-00000004')
    assert '(train: with --resume)' in line and re.search(r'about [\d.,]+ [KM]iB needed', line), line
    assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == ['step-00000002']
    assert _digests(good) == before
    assert _leftovers(out) == []

    monkeypatch.setattr(engine, 'save_file', fault.real)
    assert main(args + ['--resume', '--max-steps', '4']) == 0
    assert json.loads((out / 'metrics.json').read_text())['step'] == 4


def test_a_full_disk_at_a_stages_model_leaves_no_model_and_the_resume_writes_it(data_root, tmp_path, capsys,
                                                                                 monkeypatch):
    out = tmp_path / 'teacher'
    args = _train_args(data_root / 'labeled', out, '--max-steps', '2')
    fault = _Fault(monkeypatch, safetensors.torch, 'save_file', lambda p: p.parent.name.startswith('.model.tmp-'))
    assert main(args) == 2
    assert fault.calls == 1
    _full_disk_line(capsys.readouterr().err, out / 'model')
    assert not (out / 'model').exists() and not (out / 'metrics.json').exists()  # the stage is not finished
    assert _leftovers(out) == []

    monkeypatch.setattr(safetensors.torch, 'save_file', fault.real)
    assert main(args + ['--resume']) == 0
    assert (out / 'model' / 'model.safetensors').is_file() and (out / 'metrics.json').is_file()


def _copy_full(path):
    # shutil.copyfile's sendfile path names the source first and the destination second
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/the/source/model.safetensors', None, str(path))


def test_a_full_disk_during_export_keeps_the_earlier_export(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'export'
    assert main(['export', str(model_dir), str(out)]) == 0
    before = _digests(out)
    fault = _Fault(monkeypatch, shutil, 'copyfile', lambda p: p.parent.name.startswith('.export.tmp-'),
                   error=_copy_full)
    assert main(['export', str(model_dir), str(out)]) == 2
    assert fault.calls == 1
    line = _full_disk_line(capsys.readouterr().err, out)
    assert '/the/source' not in line
    assert _digests(out) == before
    assert _leftovers(tmp_path) == []

    monkeypatch.setattr(shutil, 'copyfile', fault.real)
    assert main(['export', str(model_dir), str(out)]) == 0
    assert _digests(out) == before


def test_a_full_disk_at_the_runs_final_export_keeps_every_stage(data_root, tmp_path, capsys, monkeypatch):
    run = tmp_path / 'run'
    cfg = {'labeled': str(data_root / 'labeled'), 'unlabeled': str(data_root / 'test'),
           'teacher': {'model': MODEL, 'epochs': 1, 'image_size': 32}, 'students': [{'model': MODEL}],
           'labels': {'threshold': 0.0, 'batch_size': 8},
           'train': {'batch_size': 8, 'num_workers': 0, 'min_steps': 0, 'max_steps': 2, 'mixed_precision': 'no'},
           'output': str(run)}
    path = tmp_path / 'run.yaml'
    path.write_text(yaml.safe_dump(cfg))
    args = ['run', str(path), '--no-progress']
    fault = _Fault(monkeypatch, shutil, 'copyfile', lambda p: p.parent.name.startswith('.final.tmp-'),
                   error=_copy_full)
    assert main(args) == 2
    assert fault.calls == 1
    _full_disk_line(capsys.readouterr().err, run / 'final')
    stages = ['iter0-teacher', 'iter1-labels', 'iter1-student']
    done = {s: (run / s / 'DONE').read_text() for s in stages}
    assert not (run / 'final').exists()
    assert _leftovers(run) == []

    monkeypatch.setattr(shutil, 'copyfile', fault.real)
    assert main(args) == 0
    assert {s: (run / s / 'DONE').read_text() for s in stages} == done  # no stage was redone
    final = (run / 'final' / 'model.safetensors').read_bytes()
    assert final == (run / 'iter1-student' / 'model' / 'model.safetensors').read_bytes()


# --- the early warning ----------------------------------------------------------------------------------

def _little_space(monkeypatch, free: int):
    usage = shutil.disk_usage('/')
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage._replace(free=free))


def _warnings(err: str):
    return [line for line in err.splitlines() if line.startswith('warning:') and 'free on' in line]


def test_a_stage_warns_early_when_its_checkpoints_may_not_fit_and_trains_on(data_root, tmp_path, capsys,
                                                                             monkeypatch):
    out = tmp_path / 'teacher'
    _little_space(monkeypatch, 2 ** 20)
    assert main(_train_args(data_root / 'labeled', out, '--max-steps', '2')) == 0
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith('warning: 1.0 MiB free on /') and f'{out} may need about ' in lines[0], lines
    assert '3 checkpoints of about' in lines[0] and 'and the model' in lines[0], lines
    assert (out / 'metrics.json').is_file()


def test_enough_space_gives_no_warning(data_root, model_dir, tmp_path, capsys, monkeypatch):
    _little_space(monkeypatch, 2 ** 40)
    assert main(_train_args(data_root / 'labeled', tmp_path / 'teacher', '--max-steps', '2')) == 0
    assert main(_label_args(model_dir, data_root / 'test', tmp_path / 'labels')) == 0
    assert _warnings(capsys.readouterr().err) == []


def test_labeling_warns_early_when_its_shards_may_not_fit(data_root, model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'labels'
    _little_space(monkeypatch, 100)
    assert main(_label_args(model_dir, data_root / 'test', out)) == 0
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1 and 'raw shards and the selected data of 20 rows' in lines[0], lines
    assert (out / 'stats.json').is_file()


# --- the directory swap, and a real full filesystem -------------------------------------------------------

def test_a_directory_swap_that_fails_puts_the_older_directory_back(tmp_path, monkeypatch):
    from timm_noisystudent.files import DiskFull, replace_dir

    out, new = tmp_path / 'model', tmp_path / '.model.tmp-1'
    for d, text in ((out, 'old'), (new, 'new')):
        d.mkdir()
        (d / 'model.safetensors').write_text(text)
    real = Path.rename

    def rename(self, target):
        if self == new:  # the disk refused the new directory entry
            raise _no_space(target)
        return real(self, target)

    monkeypatch.setattr(Path, 'rename', rename)
    with pytest.raises(DiskFull, match=f'no space left on device writing {out}: '):
        replace_dir(new, out)
    assert (out / 'model.safetensors').read_text() == 'old'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.model.tmp-1', 'model']  # no .model.old-PID


@pytest.fixture
def small_filesystem(tmp_path):
    """A tmpfs of 256 KiB mounted on a temporary folder, where this process may mount one (root on Linux)."""
    import subprocess
    where = tmp_path / 'small'
    where.mkdir()
    if not (hasattr(os, 'geteuid') and os.geteuid() == 0 and shutil.which('mount')):
        pytest.skip('mounting a small tmpfs needs root; the injected faults above cover the same sites')
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', str(where)], capture_output=True)
    if done.returncode:
        pytest.skip(f'cannot mount a tmpfs here: {done.stderr.decode(errors="replace").strip()[:200]}')
    try:
        yield where
    finally:
        subprocess.run(['umount', str(where)], check=True)


def test_an_export_onto_a_really_full_filesystem_then_with_space(model_dir, small_filesystem, capsys):
    import subprocess
    out = small_filesystem / 'export'
    assert (model_dir / 'model.safetensors').stat().st_size > 256 * 1024  # the weights cannot fit
    assert main(['export', str(model_dir), str(out)]) == 2
    line = _full_disk_line(capsys.readouterr().err, out)
    assert f'free some space on {small_filesystem} (about ' in line, line
    assert list(small_filesystem.iterdir()) == []  # no half export, no temporary

    subprocess.run(['mount', '-o', 'remount,size=4m', str(small_filesystem)], check=True)
    assert main(['export', str(model_dir), str(out)]) == 0
    assert _digests(out)['model.safetensors'] == _digests(model_dir)['model.safetensors']
