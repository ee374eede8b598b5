"""Nothing the user made is deleted or overwritten: `run` writes and cleans only in a new, empty or
run directory, `export` replaces only an earlier export, and `label` removes its own temporaries.

Every test plants user files first and checks, byte for byte, that they are still there.
"""
import errno
import os
import shutil
from pathlib import Path

import pytest
import yaml

from timm_noisystudent.cli import main
from timm_noisystudent.demo import write_demo_data
from timm_noisystudent.files import LOCK_NAME
from timm_noisystudent.rundir import remove_leftovers

MODEL = 'test_efficientnet'

# hidden *.old / *.tmp names that the tool's own temporaries look like, and plain user files
USER_FILES = {
    '.bashrc.old': 'a', '.emacs.d.old/init.el': 'b', '.cache/pip/.wheel.tmp-1234': 'c',
    'Documents/.thesis.docx.old': 'd', 'project/.env.tmp': 'e', 'notes.txt': 'f',
    'config.yaml': 'my: own config\n', 'summary.md': '# my summary\n',
}


def _plant(root: Path, files=USER_FILES) -> dict:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return {rel: text for rel, text in files.items()}


def _untouched(root: Path, planted: dict) -> None:
    for rel, text in planted.items():
        assert (root / rel).is_file(), f'{rel} was deleted'
        assert (root / rel).read_text() == text, f'{rel} was overwritten'


from conftest import error_line as _error_line, tiny_model_dir  # noqa: E402


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('userfiles') / 'data'
    write_demo_data(root, per_class=3, n_test=20)
    return root


def _config(data_root: Path, tmp_path: Path, output, root: Path = None) -> Path:
    root = root or data_root
    cfg = {'labeled': str(root / 'labeled'), 'unlabeled': str(root / 'unlabeled'),
           'teacher': {'model': MODEL, 'epochs': 1, 'image_size': 32}, 'students': [{'model': MODEL}],
           'train': {'batch_size': 8, 'num_workers': 0, 'min_steps': 0}, 'output': str(output)}
    path = tmp_path / 'run.yaml'
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_refuses_a_non_empty_folder_that_is_not_a_run(data_root, tmp_path, capsys):
    home = tmp_path / 'fakehome'
    planted = _plant(home)
    assert main(['run', str(_config(data_root, tmp_path, home))]) == 2
    line = _error_line(capsys.readouterr().err)
    assert 'is not empty and is not a noisystudent run' in line and 'new or empty directory' in line
    _untouched(home, planted)
    assert sorted(p.name for p in home.iterdir()) == sorted({Path(r).parts[0] for r in USER_FILES})


def test_run_into_the_current_folder_with_user_files_is_refused(data_root, tmp_path, capsys, monkeypatch):
    cwd = tmp_path / 'cwd'
    planted = _plant(cwd)
    monkeypatch.chdir(cwd)
    assert main(['run', str(_config(data_root, tmp_path, 'ignored')), '-o', '.']) == 2
    assert 'is not a noisystudent run' in _error_line(capsys.readouterr().err)
    _untouched(cwd, planted)
    assert not (cwd / LOCK_NAME).exists()


def test_run_refuses_an_output_that_contains_its_inputs(data_root, tmp_path, capsys):
    parent = tmp_path / 'datacopy'
    for split in ('labeled', 'unlabeled'):
        shutil.copytree(data_root / split, parent / split)
    planted = _plant(parent / 'unlabeled', {'.notes.txt.old': 'keep me'})
    assert main(['run', str(_config(data_root, tmp_path, parent, root=parent))]) == 2
    assert 'contains the labeled folder' in _error_line(capsys.readouterr().err)
    _untouched(parent / 'unlabeled', planted)


def test_a_folder_with_only_the_users_own_config_yaml_is_not_taken_for_a_run(data_root, tmp_path, capsys):
    planted = _plant(tmp_path / 'project', {'config.yaml': '# my notes on this run\nlabeled: x\n'})
    assert main(['run', str(_config(data_root, tmp_path, tmp_path / 'project'))]) == 2
    assert 'holds config.yaml' in _error_line(capsys.readouterr().err)
    _untouched(tmp_path / 'project', planted)


def test_a_file_as_the_output_is_refused(data_root, tmp_path, capsys):
    out = tmp_path / 'out.txt'
    out.write_text('mine')
    assert main(['run', str(_config(data_root, tmp_path, out))]) == 2
    assert 'is a file' in _error_line(capsys.readouterr().err)
    assert out.read_text() == 'mine'


def test_leftover_cleanup_removes_only_the_runs_own_temporaries(tmp_path):
    run = tmp_path / 'run'
    own = ['.config.yaml.tmp-123', '.final.old-77/model.safetensors', 'iter0-teacher/.metrics.json.tmp-5',
           'iter0-teacher/checkpoints/.step-00000010.tmp/x', 'sources/.labeled.tmp/index.arrow']
    kept = {LOCK_NAME: '', 'config.yaml': 'run: config\n', 'iter0-teacher/metrics.json': '{}',
            'iter0-teacher/checkpoints/step-00000005/x': 'weights'}
    _plant(run, {rel: 'x' for rel in own})
    _plant(run, kept)
    remove_leftovers(run)
    for rel in own:
        assert not (run / Path(rel).parts[0]).exists() if Path(rel).parts[0].startswith('.') \
            else not (run / rel).exists(), rel
    _untouched(run, kept)


def test_leftover_cleanup_refuses_a_folder_that_is_not_a_run(tmp_path):
    from timm_noisystudent.config import UserError
    planted = _plant(tmp_path / 'home', {LOCK_NAME: '', '.bashrc.old': 'a', 'Documents/.x.tmp': 'b'})
    with pytest.raises(UserError, match='not a run directory'):
        remove_leftovers(tmp_path / 'home')
    _untouched(tmp_path / 'home', planted)


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp('model') / 'model')


def test_export_refuses_a_model_folder_with_other_files(model_dir, tmp_path, capsys):
    assert main(['export', str(model_dir), str(tmp_path / 'mine')]) == 0
    planted = _plant(tmp_path / 'mine', {'NOTES.txt': 'my notes', 'data/labels.parquet': 'rows'})
    before = (tmp_path / 'mine' / 'model.safetensors').read_bytes()
    assert main(['export', str(model_dir), str(tmp_path / 'mine')]) == 2
    line = _error_line(capsys.readouterr().err)
    assert 'not an earlier export' in line and 'NOTES.txt' in line
    _untouched(tmp_path / 'mine', planted)
    assert (tmp_path / 'mine' / 'model.safetensors').read_bytes() == before


def test_export_refuses_a_training_output_that_is_not_an_export(model_dir, tmp_path, capsys):
    # a model directory as train writes it (config.json + weights, no card) is the user's work, not an export
    assert main(['export', str(model_dir), str(model_dir)]) == 2
    assert 'not an earlier export' in _error_line(capsys.readouterr().err)
    assert (model_dir / 'model.safetensors').is_file()


def test_export_replaces_an_earlier_export(model_dir, tmp_path):
    assert main(['export', str(model_dir), str(tmp_path / 'exp')]) == 0
    (tmp_path / 'exp' / 'README.md').write_text('stale card')
    assert main(['export', str(model_dir), str(tmp_path / 'exp')]) == 0
    assert sorted(p.name for p in (tmp_path / 'exp').iterdir()) == ['README.md', 'config.json', 'model.safetensors']


def test_label_removes_its_temporaries_when_the_disk_fills(data_root, model_dir, tmp_path, capsys, monkeypatch):
    from timm_noisystudent import labeling

    write = labeling._write_parquet
    calls = {'n': 0}

    def full_on_selection(table, path):
        if Path(path).parent.name.startswith('.data.tmp-'):
            calls['n'] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write(table, path)

    monkeypatch.setattr(labeling, '_write_parquet', full_on_selection)
    out = tmp_path / 'labels'
    args = ['label', '--teacher', str(model_dir), '--data', str(data_root / 'unlabeled'), '--output', str(out),
            '--threshold', '0', '--batch-size', '8', '--num-workers', '0', '--mixed-precision', 'no']
    assert main(args) == 2
    assert calls['n'] == 1
    _error_line(capsys.readouterr().err)
    assert not list(out.glob('.data.tmp-*'))
    monkeypatch.setattr(labeling, '_write_parquet', write)
    assert main(args) == 0
    assert list((out / 'data').glob('*.parquet')) and not list(out.glob('.data.tmp-*'))


# --- tiny inputs that would exhaust memory or hang ---------------------------------------------------

def _bounded(cmd, tmp_path, seconds=300):
    """The CLI in a child process with 16 GB of address space at most (torch maps several) and a time limit."""
    import resource
    import subprocess
    import sys
    from conftest import hub_env

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))
    return subprocess.run([sys.executable, '-m', 'timm_noisystudent', *cmd], capture_output=True, text=True,
                          timeout=seconds, preexec_fn=limit, cwd=tmp_path, env=hub_env(OMP_NUM_THREADS='1'))


def test_a_yaml_alias_bomb_is_one_line_not_all_the_memory(data_root, tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for k in range(1, 10):
        lines.append(f'{chr(97 + k)}: &{chr(97 + k)} [' + ','.join([f'*{chr(96 + k)}'] * 9) + ']')
    bomb = tmp_path / 'bomb.yaml'
    bomb.write_text('\n'.join(lines) + f'\nlabeled: {{path: {data_root / "labeled"}, name: *j}}\n'
                    f'unlabeled: {data_root / "unlabeled"}\n')
    proc = _bounded(['run', str(bomb), '-o', str(tmp_path / 'out')], tmp_path, seconds=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr and len(_error_line(proc.stderr)) < 400


def test_a_fifo_and_a_link_to_dev_zero_in_an_image_folder_are_undecodable_not_a_hang(data_root, model_dir,
                                                                                  tmp_path):
    folder = tmp_path / 'unlabeled'
    shutil.copytree(data_root / 'unlabeled', folder)
    os.mkfifo(folder / 'zz_fifo.png')
    (folder / 'zz_zero.png').symlink_to('/dev/zero')
    proc = _bounded(['label', '--teacher', str(model_dir), '--data', str(folder), '--output', str(tmp_path / 'l'),
                     '--threshold', '0', '--batch-size', '8', '--num-workers', '0', '--no-progress'], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '(2 undecodable' in proc.stdout, proc.stdout
