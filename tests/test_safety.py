"""Issue 13: labels stay paired with their images, one process per output, no partial file taken
as complete, and every bad input a one-line error with exit code 2.

Data is scikit-learn's digits written as folders; models are timm's tiny ``test_efficientnet``.
Each test makes its fault for real: images added to a folder, a second process holding a lock,
a shard cut short or replaced, a JSON file overwritten with garbage.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import yaml

from timm_noisystudent.cli import main
from timm_noisystudent.demo import write_demo_data

CLI = [sys.executable, '-m', 'timm_noisystudent']
MODEL = 'test_efficientnet'

pytestmark = pytest.mark.filterwarnings('ignore:the confidence threshold')


def _env(**extra):
    from conftest import hub_env
    return hub_env(OMP_NUM_THREADS='1', **extra)


from conftest import error_line as _error_line, tiny_model_dir  # noqa: E402


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('safety') / 'data'
    write_demo_data(root, per_class=3, n_test=60)
    return root


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp('model') / 'model', [f'digit_{i}' for i in range(10)])


def _unlabeled_copy(data_root: Path, dest: Path, n: int = 24) -> Path:
    dest.mkdir(parents=True)
    for f in sorted((data_root / 'unlabeled').iterdir())[:n]:
        shutil.copy(f, dest / f.name)
    return dest


def _label(model_dir, data, out, *extra) -> list:
    return ['label', '--teacher', str(model_dir), '--data', str(data), '--output', str(out), '--threshold', '0',
            '--batch-size', '8', '--num-workers', '0', '--mixed-precision', 'no', *extra]


def _train(data_root, out, *extra) -> list:
    return ['train', '--data', str(data_root / 'labeled'), '--model', MODEL, '--image-size', '32', '--epochs', '1',
            '--batch-size', '8', '--num-workers', '0', '--mixed-precision', 'no', '--min-steps', '0',
            '--output', str(out), *extra]


# --- 1. pseudo labels stay paired with the images they were made from ------------------------------

def test_images_added_after_labeling_are_refused(data_root, model_dir, tmp_path, capsys):
    unl = _unlabeled_copy(data_root, tmp_path / 'unl')
    assert main(_label(model_dir, unl, tmp_path / 'labels')) == 0
    stats = json.loads((tmp_path / 'labels' / 'stats.json').read_text())
    assert stats['source_identity']['rows'] == 24
    shutil.copy(sorted((data_root / 'unlabeled').iterdir())[30], unl / '0000_new.png')  # sorts first: rows shift
    capsys.readouterr()
    assert main(_train(data_root, tmp_path / 'student', '--pseudo', str(tmp_path / 'labels'))) == 2
    line = _error_line(capsys.readouterr().err)
    assert f'does not match the pseudo labels in {tmp_path / "labels"}' in line
    assert 'it has 25 rows, and 24 when it was labeled' in line and 'noisystudent label' in line
    assert not (tmp_path / 'student' / 'model').exists()


def test_another_set_of_the_same_size_is_refused(data_root, model_dir, tmp_path, capsys):
    unl = _unlabeled_copy(data_root, tmp_path / 'unl')
    other = tmp_path / 'other'
    other.mkdir()
    for i, f in enumerate(sorted((data_root / 'unlabeled').iterdir())[100:124]):
        shutil.copy(f, other / sorted(p.name for p in unl.iterdir())[i])  # the same names, other images
    assert main(_label(model_dir, unl, tmp_path / 'labels')) == 0
    capsys.readouterr()
    assert main(_train(data_root, tmp_path / 'student', '--pseudo', str(tmp_path / 'labels'),
                       '--unlabeled-data', str(other))) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(other) in line and str(unl.resolve()) in line and 'its images differ' in line
    # the set it was labeled from is still accepted
    assert main(_train(data_root, tmp_path / 'student', '--pseudo', str(tmp_path / 'labels'),
                       '--unlabeled-data', str(unl))) == 0


def test_a_relative_path_is_found_from_another_working_directory(data_root, model_dir, tmp_path, monkeypatch):
    here, elsewhere = tmp_path / 'here', tmp_path / 'elsewhere'
    _unlabeled_copy(data_root, here / 'unlabeled')
    other = elsewhere / 'unlabeled'  # a different folder of the same relative name
    other.mkdir(parents=True)
    for f in sorted((data_root / 'unlabeled').iterdir())[200:210]:
        shutil.copy(f, other / f.name)
    monkeypatch.chdir(here)
    assert main(_label(model_dir, 'unlabeled', here / 'labels')) == 0
    assert json.loads((here / 'labels' / 'stats.json').read_text())['source']['resolved'] == \
        str((here / 'unlabeled').resolve())
    monkeypatch.chdir(elsewhere)
    assert main(_train(data_root, tmp_path / 'student', '--pseudo', str(here / 'labels'))) == 0
    assert (tmp_path / 'student' / 'model' / 'model.safetensors').is_file()
    # the folder of that name here is not the one labeled
    assert main(_train(data_root, tmp_path / 'student2', '--pseudo', str(here / 'labels'),
                       '--unlabeled-data', 'unlabeled')) == 2


def test_a_quoted_tilde_means_the_home_folder_for_every_path(data_root, model_dir, tmp_path, monkeypatch, capsys):
    home, cwd = tmp_path / 'home', tmp_path / 'cwd'
    _unlabeled_copy(data_root, home / 'unl', n=8)
    shutil.copytree(model_dir, home / 'model')
    shutil.copy(sorted((data_root / 'unlabeled').iterdir())[30], home / 'img.png')
    (home / 'train.yaml').write_text('train: {batch_size: 4}\n')
    cwd.mkdir()
    monkeypatch.setenv('HOME', str(home))
    monkeypatch.chdir(cwd)
    assert main(_label('~/model', '~/unl', '~/labels')) == 0
    assert main(['train', '--data', str(data_root / 'labeled'), '--model', MODEL, '--image-size', '32',
                 '--epochs', '1', '--num-workers', '0', '--mixed-precision', 'no', '--min-steps', '0',
                 '--max-steps', '1', '--pseudo', '~/labels', '--unlabeled-data', '~/unl', '--init-from', '~/model',
                 '--config', '~/train.yaml', '-o', '~/student']) == 0
    assert main(['predict', '~/img.png', '--model', '~/student/model', '--json']) == 0
    assert main(['export', '~/student', '~/exp']) == 0
    out = capsys.readouterr().out
    assert str(home / 'img.png') in out and f'-> {home}/exp' in out
    assert json.loads((home / 'student' / 'metrics.json').read_text())['batch_size'] == 4
    assert (home / 'labels' / 'stats.json').is_file() and (home / 'exp' / 'model.safetensors').is_file()
    assert list(cwd.iterdir()) == []  # no literal '~' folder
    from timm_noisystudent.cli import _expand_user, build_parser
    for argv in (['run', '~/run.yaml', '-o', '~'], ['bench', '--workdir', '~/w', '--json', '~/b.json'],
                 ['push', '~/r', '--repo-id', 'a/b'], ['push-labels', '~/l', '--repo-id', 'a/b']):
        args = build_parser().parse_args(argv)
        _expand_user(args)
        assert not any(str(v).startswith('~') for v in vars(args).values()), (argv, vars(args))


def test_a_resumed_run_refuses_labels_of_a_changed_folder(data_root, tmp_path, capsys):
    unl = _unlabeled_copy(data_root, tmp_path / 'unl', n=32)
    cfg = {
        'labeled': str(data_root / 'labeled'), 'unlabeled': str(unl), 'eval': str(data_root / 'test'),
        'teacher': {'model': MODEL, 'epochs': 1, 'image_size': 32},
        'students': [{'model': MODEL, 'epochs': 1}],
        'labels': {'threshold': 0.0, 'batch_size': 8, 'mixed_precision': 'no'},
        'train': {'batch_size': 8, 'num_workers': 0, 'mixed_precision': 'no', 'min_steps': 0},
        'output': str(tmp_path / 'run'),
    }
    config = tmp_path / 'run.yaml'
    config.write_text(yaml.safe_dump(cfg))
    assert main(['run', str(config), '--no-progress']) == 0
    shutil.rmtree(tmp_path / 'run' / 'iter1-student')  # the student is not done; its labels are
    shutil.copy(sorted((data_root / 'unlabeled').iterdir())[40], unl / '0000_new.png')
    capsys.readouterr()
    assert main(['run', str(config), '--no-progress']) == 2
    line = _error_line(capsys.readouterr().err)
    assert 'does not match the pseudo labels' in line and '--restart-from iter1-labels' in line
    assert main(['run', str(config), '--no-progress', '--restart-from', 'iter1-labels']) == 0
    stats = json.loads((tmp_path / 'run' / 'iter1-labels' / 'stats.json').read_text())
    assert stats['source_identity']['rows'] == 33


# --- 2. one process per output directory -----------------------------------------------------------

def _wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None and predicate()


@pytest.mark.parametrize('command', ['train', 'run'])
def test_a_second_process_on_the_same_output_stops_with_the_holders_pid(command, data_root, tmp_path, capsys):
    out = tmp_path / 'out'
    if command == 'train':
        argv = _train(data_root, out)
        first = argv[:argv.index('--epochs') + 1] + ['500'] + argv[argv.index('--epochs') + 2:]
    else:
        cfg = {'labeled': str(data_root / 'labeled'), 'unlabeled': str(data_root / 'unlabeled'),
               'teacher': {'model': MODEL, 'epochs': 500, 'image_size': 32}, 'students': [],
               'train': {'batch_size': 8, 'num_workers': 0, 'mixed_precision': 'no', 'min_steps': 0}}
        config = tmp_path / 'run.yaml'
        config.write_text(yaml.safe_dump(cfg))
        first = ['run', str(config), '-o', str(out), '--no-progress']
        argv = ['run', str(config), 'seed=1', '-o', str(out), '--no-progress']
    log = open(tmp_path / 'first.log', 'w')
    proc = subprocess.Popen(CLI + first, stdout=log, stderr=subprocess.STDOUT, env=_env())
    try:
        _wait_for(lambda: (out / '.noisystudent.lock.pid').is_file(), proc)
        assert main(argv) == 2
        line = _error_line(capsys.readouterr().err)
        assert f'{out} is in use by another noisystudent process (pid {proc.pid})' in line
        if command == 'run':  # the holder's config stands
            _wait_for(lambda: (out / 'config.yaml').is_file(), proc)
            assert yaml.safe_load((out / 'config.yaml').read_text())['seed'] == 0
    finally:
        proc.kill()  # SIGKILL: the lock must die with the process
        proc.wait()
        log.close()
    # a killed holder blocks nothing (a short teacher this time)
    again = argv + ['--resume'] if command == 'train' else ['run', str(config), 'teacher.epochs=1', '-o', str(out)]
    assert main(again) == 0


# --- 3. partial or foreign files are never taken as complete ---------------------------------------

def _selected(labels_dir: Path) -> dict:
    import datasets
    files = sorted(str(p) for p in (labels_dir / 'data').glob('*.parquet'))
    return datasets.load_dataset('parquet', data_files=files, split='train').to_dict()


@pytest.mark.parametrize('damage', ['truncated', 'ten-rows-of-its-range', 'no-metadata'])
def test_a_damaged_raw_shard_is_redone(damage, data_root, model_dir, tmp_path, capsys):
    import pyarrow.parquet as pq
    unl = _unlabeled_copy(data_root, tmp_path / 'unl', n=24)
    ref, out = tmp_path / 'ref', tmp_path / 'labels'
    assert main(_label(model_dir, unl, ref, '--rows-per-shard', '8')) == 0
    assert main(_label(model_dir, unl, out, '--rows-per-shard', '8')) == 0
    shard = out / 'raw' / 'rows-000000000008-000000000016.parquet'
    table = pq.read_table(shard)
    if damage == 'truncated':
        shard.write_bytes(shard.read_bytes()[:200])
    elif damage == 'ten-rows-of-its-range':  # valid parquet, our metadata, but rows missing
        pq.write_table(table.slice(0, 3), shard)
    else:
        pq.write_table(table.replace_schema_metadata(None), shard)
    capsys.readouterr()
    assert main(_label(model_dir, unl, out, '--rows-per-shard', '8')) == 0
    captured = capsys.readouterr()
    assert f'warning: redoing the raw shard {shard.name}:' in captured.err and 'Traceback' not in captured.err
    assert 'labeled 24 images (0 undecodable, 16 from earlier shards)' in captured.out
    assert _selected(out) == _selected(ref)


def _tiny_run(data_root, tmp_path, **train) -> Path:
    cfg = {
        'labeled': str(data_root / 'labeled'), 'unlabeled': {'path': str(data_root / 'unlabeled'),
                                                             'split': 'train[:32]'},
        'eval': str(data_root / 'test'),
        'teacher': {'model': MODEL, 'epochs': 2, 'image_size': 32},
        'students': [{'model': MODEL, 'epochs': 1}],
        'labels': {'threshold': 0.0, 'batch_size': 8, 'mixed_precision': 'no'},
        'train': {'batch_size': 8, 'num_workers': 0, 'mixed_precision': 'no', 'min_steps': 0, **train},
        'output': str(tmp_path / 'run'),
    }
    config = tmp_path / 'run.yaml'
    config.write_text(yaml.safe_dump(cfg))
    return config


def test_a_garbage_stage_json_redoes_that_stage_with_one_line(data_root, tmp_path, capsys):
    config = _tiny_run(data_root, tmp_path)
    assert main(['run', str(config), '--no-progress']) == 0
    (tmp_path / 'run' / 'iter1-student' / 'stage.json').write_text('{not json')
    capsys.readouterr()
    assert main(['run', str(config), '--no-progress']) == 0
    captured = capsys.readouterr()
    assert 'stage.json is not valid JSON' in captured.err and 'redoing iter1-student' in captured.err
    assert 'iter0-teacher: done, skipped' in captured.out and 'iter1-student: training' in captured.out
    assert json.loads((tmp_path / 'run' / 'iter1-student' / 'stage.json').read_text())['config_hash']


@pytest.mark.parametrize('stage,lost', [('iter0-teacher', 'model/model.safetensors'),
                                        ('iter1-labels', 'data'), ('iter1-student', 'metrics.json')])
def test_a_done_stage_that_lost_its_files_names_the_restart(stage, lost, data_root, tmp_path, capsys):
    config = _tiny_run(data_root, tmp_path)
    assert main(['run', str(config), '--no-progress']) == 0
    target = tmp_path / 'run' / stage / lost
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    capsys.readouterr()
    assert main(['run', str(config), '--no-progress']) == 2
    line = _error_line(capsys.readouterr().err)
    assert f'stage {stage} is marked done but' in line and f'--restart-from {stage}' in line


def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(data_root, tmp_path, capsys):
    out = tmp_path / 'out'
    argv = _train(data_root, out, '--checkpoint-every', '1', '--epochs', '4')
    assert main(argv + ['--max-steps', '3']) == 0
    ckpts = sorted((out / 'checkpoints').glob('step-*'))
    assert len(ckpts) == 2
    (ckpts[-1] / 'trainer_state.json').write_text('{"step": ')
    (out / 'metrics.json').unlink()  # as after a kill: unfinished
    capsys.readouterr()
    assert main(argv + ['--resume']) == 0
    captured = capsys.readouterr()
    assert f'checkpoint {ckpts[-1]} cannot be read (JSONDecodeError); resuming from the one before it, ' \
           f'{ckpts[0].name}' in captured.err
    assert f'resuming from {ckpts[0]}' in captured.out


def test_train_again_without_resume_over_an_unfinished_one_is_refused(data_root, tmp_path, capsys):
    out = tmp_path / 'out'
    argv = _train(data_root, out, '--checkpoint-every', '1')
    assert main(argv + ['--max-steps', '2']) == 0
    (out / 'metrics.json').unlink()  # as after a kill
    capsys.readouterr()
    assert main(argv) == 2
    assert '--resume' in _error_line(capsys.readouterr().err)
    assert main(argv + ['--resume']) == 0


# --- 4-6. every bad input is one line with exit code 2, and the line is right ---------------------

@pytest.fixture(scope='module')
def bad_models(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp('bad-models')
    out = {}
    for name in ('badjson', 'badarch', 'trunc'):
        shutil.copytree(model_dir, root / name)
        out[name] = root / name
    (root / 'badjson' / 'config.json').write_text('{"architecture": "test_efficientnet", oops}')
    cfg = json.loads((root / 'badarch' / 'config.json').read_text())
    (root / 'badarch' / 'config.json').write_text(json.dumps(dict(cfg, architecture='no_such_net')))
    weights = root / 'trunc' / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    for name in ('classes11', 'zero_size'):
        shutil.copytree(model_dir, root / name)
        out[name] = root / name
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(root / 'classes11' / 'model.safetensors'))
    tensors['backdoor.weight'] = tensors['classifier.weight'].clone()  # a tensor the architecture lacks
    save_file(tensors, str(root / 'classes11' / 'model.safetensors'))
    cfg = json.loads((root / 'zero_size' / 'config.json').read_text())
    cfg['pretrained_cfg'] = dict(cfg.get('pretrained_cfg') or {}, input_size=[3, 0, 0])
    (root / 'zero_size' / 'config.json').write_text(json.dumps(cfg))
    one_class = root / 'one-class' / 'cats'
    one_class.mkdir(parents=True)
    out['one-class'] = root / 'one-class'
    shutil.copytree(model_dir, root / 'stages-only' / 'iter0-teacher' / 'model')  # a run's stage, no config.yaml
    out['stages-only'] = root / 'stages-only'
    return out


def _image(data_root) -> str:
    return str(next((data_root / 'test').rglob('*.png')))


CASES = {
    'config.json not JSON': (['predict', '{img}', '--model', '{badjson}'], 'config.json is not valid JSON'),
    'unknown architecture': (['predict', '{img}', '--model', '{badarch}'],
                             "names the architecture 'no_such_net', which this timm"),
    'truncated safetensors': (['eval', '--model', '{trunc}', '--data', '{test}'],
                              'model.safetensors cannot be read'),
    'predict --top-k -1': (['predict', '{img}', '--model', '{model}', '--top-k', '-1'],
                           '--top-k must be at least 1, got -1'),
    'predict --top-k 0': (['predict', '{img}', '--model', '{model}', '--top-k', '0'],
                          '--top-k must be at least 1, got 0'),
    'percent slice out of range': (['label', '--teacher', '{model}', '--data', '{unl}', '-o', '{out}',
                                    '--split', 'train[:200%]'], "bad split 'train[:200%]'"),
    'eval --batch-size 0': (['eval', '--model', '{model}', '--data', '{test}', '--batch-size', '0'],
                            '--batch-size must be at least 1, got 0'),
    'eval --image-size -5': (['eval', '--model', '{model}', '--data', '{test}', '--image-size', '-5'],
                             '--image-size must be at least 1, got -5'),
    'tracker typo': (['train', '--data', '{labeled}', '--model', MODEL, '-o', '{out}', '--log-with', 'tensorbord'],
                     "--log-with: unknown tracker 'tensorbord'; Accelerate knows"),
    'train --image-size 0': (['train', '--data', '{labeled}', '--model', MODEL, '-o', '{out}', '--image-size', '0'],
                             '--image-size must be at least 1, got 0'),
    'train --freeze-blocks 99': (['train', '--data', '{labeled}', '--model', MODEL, '--image-size', '32', '-o', '{out}',
                                  '--freeze-blocks', '99'], '--freeze-blocks 99 is more than the'),
    'train --randaugment bogus': (['train', '--data', '{labeled}', '--model', MODEL, '-o', '{out}',
                                   '--randaugment', 'bogus'], '--randaugment: '),
    'label --rows-per-shard 0': (['label', '--teacher', '{model}', '--data', '{unl}', '-o', '{out}',
                                  '--rows-per-shard', '0'], '--rows-per-shard must be at least 1, got 0'),
    'label --rows-per-shard -5': (['label', '--teacher', '{model}', '--data', '{unl}', '-o', '{out}',
                                   '--rows-per-shard', '-5'], '--rows-per-shard must be at least 1, got -5'),
    'label output inside its input': (['label', '--teacher', '{model}', '--data', '{unl}', '-o', '{unl}/labels'],
                                      'lies inside the unlabeled folder'),
    'a look-alike letter in a model name': (['predict', '{img}', '--model', 'tf_efficientnet_bO_ns'],
                                            'Did you mean: tf_efficientnet_b0_ns,'),
    'a one-class image folder': (['train', '--data', '{one-class}', '--model', MODEL, '-o', '{out}'],
                                 'with only one, it has no labels'),
    'weights that do not fit config.json': (['predict', '{img}', '--model', '{classes11}'],
                                            'do not fit the architecture its config.json names'),
    'a zero input size in config.json': (['predict', '{img}', '--model', '{zero_size}'],
                                         'it must be [3, H, W] with H and W above 0'),
    'the label column as the image column': (['train', '--data', '{labeled}', '--model', MODEL, '-o', '{out}',
                                              '--image-column', 'label'], "'label' is both the image and the label"),
    'run stages without the run': (['export', '{stages-only}', '{out}'],
                                    'holds run stages (iter0-teacher) but no config.yaml, so it is not a run '
                                    'directory; export one of its stage directories, such as '
                                    '{stages-only}/iter0-teacher.'),
    'a moved relative path': (['train', '--data', '{rel-missing}', '--model', MODEL, '-o', '{out}'],
                              'data path {rel-missing} does not exist'),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_input_is_one_right_line_with_exit_code_2(case, data_root, model_dir, bad_models, tmp_path, capsys,
                                                      monkeypatch):
    argv, expected = CASES[case]
    one_class = bad_models['one-class'] / 'cats'
    for f in sorted((data_root / 'unlabeled').iterdir())[:3]:
        shutil.copy(f, one_class / f.name)
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'data').mkdir()
    unl = _unlabeled_copy(data_root, tmp_path / 'unl', n=8)
    paths = {k: str(v) for k, v in bad_models.items()}
    paths.update(img=_image(data_root), model=str(model_dir), test=str(data_root / 'test'), unl=str(unl),
                 labeled=str(data_root / 'labeled'), out=str(tmp_path / 'out'), **{'rel-missing': 'data/gone'})
    argv = [a.format(**paths) for a in argv]
    assert main(argv + (['--num-workers', '0'] if argv[0] in ('train', 'label', 'eval') else [])) == 2
    assert expected.format(**paths) in _error_line(capsys.readouterr().err)
    assert not (unl / 'labels').exists() and not (tmp_path / 'out').exists()  # nothing made before the error


def test_a_missing_tracker_package_is_one_line_naming_it(data_root, tmp_path, capsys):
    pytest.importorskip('accelerate')
    try:
        import tensorboard  # noqa: F401
        pytest.skip('tensorboard is installed here')
    except ImportError:
        pass
    assert main(_train(data_root, tmp_path / 'out', '--log-with', 'tensorboard')) == 2
    assert '`pip install tensorboard`' in _error_line(capsys.readouterr().err)


def _run_config(data_root, tmp_path, **extra) -> Path:
    cfg = {'labeled': str(data_root / 'labeled'), 'unlabeled': str(data_root / 'unlabeled'),
           'teacher': {'model': MODEL, 'epochs': 1, 'image_size': 32},
           'students': [{'model': MODEL}, {'model': 'tf_efficientnet_b9_ns'}],
           'train': {'batch_size': 8, 'num_workers': 0, 'min_steps': 0}, 'output': str(tmp_path / 'run'), **extra}
    config = tmp_path / 'run.yaml'
    config.write_text(yaml.safe_dump(cfg))
    return config


@pytest.mark.parametrize('override,expected', [
    ([], "students.1.model: unknown model 'tf_efficientnet_b9_ns'. Did you mean:"),
    (['students.1.model=test_efficientnet', 'train.log_with=tensorbord'],
     "train.log_with: unknown tracker 'tensorbord'"),
    (['students.1.model=test_efficientnet', 'students.0.model=hf-hub:org/no-such-model'],
     "students.0.model: model repo 'org/no-such-model' was not found on the Hub"),
])
def test_run_checks_every_stage_before_the_teacher_trains(override, expected, data_root, tmp_path, capsys,
                                                          hub_server):
    config = _run_config(data_root, tmp_path)
    assert main(['run', str(config), *override]) == 2
    assert expected in _error_line(capsys.readouterr().err)
    assert not (tmp_path / 'run').exists()
    assert main(['run', str(config), *override, '--print-config']) == 2  # what run refuses is not printed as fine
    assert expected in _error_line(capsys.readouterr().err)


def test_print_config_refuses_a_bad_repo_id_and_needs_no_token(data_root, tmp_path, capsys, monkeypatch):
    config = _run_config(data_root, tmp_path, students=[{'model': MODEL}])
    assert main(['run', str(config), 'hub.repo_id=my org/bad name', '--print-config']) == 2
    assert "hub.repo_id: invalid repo id 'my org/bad name'" in _error_line(capsys.readouterr().err)
    monkeypatch.delenv('HF_TOKEN')
    assert main(['run', str(config), 'hub.repo_id=my-org/good']) == 2  # run needs the token to push at the end
    assert 'no Hugging Face token' in _error_line(capsys.readouterr().err)
    assert main(['run', str(config), 'hub.repo_id=my-org/good', '--print-config']) == 0
    assert 'repo_id: my-org/good' in capsys.readouterr().out


def test_a_run_inside_its_data_is_refused(data_root, tmp_path, capsys):
    config = _run_config(data_root, tmp_path)
    assert main(['run', str(config), 'students.1.model=test_efficientnet', '-o',
                 str(data_root / 'unlabeled' / 'run')]) == 2
    assert 'lies inside the unlabeled folder' in _error_line(capsys.readouterr().err)
    assert not (data_root / 'unlabeled' / 'run').exists()


def test_hub_model_errors_name_the_repo_and_the_offline_switch(data_root, capsys, hub_server, monkeypatch):
    repo = hub_server.unique_repo_id('missing')
    assert main(['predict', _image(data_root), '--model', f'hf-hub:{repo}']) == 2
    line = _error_line(capsys.readouterr().err)
    assert f'hf-hub:{repo}' in line and 'not on the Hub' in line
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    assert main(['predict', _image(data_root), '--model', f'hf-hub:{repo}']) == 2
    assert 'HF_HUB_OFFLINE is set' in _error_line(capsys.readouterr().err)


def test_a_bad_hub_id_or_revision_is_one_line_that_says_which(data_root, model_dir, hub_server, capsys):
    assert main(['predict', _image(data_root), '--model', 'hf-hub:../../x']) == 2
    assert 'is not a Hub model id' in _error_line(capsys.readouterr().err)
    repo = hub_server.unique_repo_id('revisions')
    assert main(['push', str(model_dir), '--repo-id', repo]) == 0
    capsys.readouterr()
    assert main(['predict', _image(data_root), '--model', f'hf-hub:{repo}@nope']) == 2
    line = _error_line(capsys.readouterr().err)
    assert 'is on the Hub' in line and 'that revision is not' in line and 'repo not found' not in line


def test_credentials_in_hf_endpoint_are_never_shown(monkeypatch):
    from huggingface_hub import constants
    from timm_noisystudent.models import hub_endpoint
    monkeypatch.setattr(constants, 'ENDPOINT', 'http://user:hf_URLsecret_555@127.0.0.1:9')
    assert hub_endpoint() == 'http://127.0.0.1:9'


def test_a_temporary_name_in_an_os_error_is_shown_as_the_path_given():
    from timm_noisystudent.cli import _os_error
    e = OSError(30, 'Read-only file system', '/srv/models/.export.tmp-x1y2z3/model.safetensors')
    line = _os_error(e)
    assert '/srv/models/export/model.safetensors' in line and '.tmp-' not in line


def test_threshold_zero_gives_no_advice_to_lower_it(data_root, model_dir, tmp_path, capsys):
    unl = _unlabeled_copy(data_root, tmp_path / 'unl', n=16)
    assert main(_label(model_dir, unl, tmp_path / 'labels')) == 0
    assert 'lower the threshold' not in capsys.readouterr().err


def test_labels_of_images_none_of_which_decoded_say_so_not_lower_the_threshold(data_root, model_dir, tmp_path,
                                                                               capsys):
    bad = tmp_path / 'allbad'
    bad.mkdir()
    for i in range(4):
        (bad / f'b{i}.png').write_text(f'not an image {i}')
    assert main(_label(model_dir, bad, tmp_path / 'labels')) == 2
    capsys.readouterr()
    assert main(_train(data_root, tmp_path / 'student', '--pseudo', str(tmp_path / 'labels'))) == 2
    line = _error_line(capsys.readouterr().err)
    assert 'none of the 4 images it was made from could be decoded' in line and 'stats.json' in line
    assert 'threshold' not in line


def test_fsdp_on_cpu_is_one_line_from_one_process(data_root, tmp_path):
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--use_fsdp', '--num_processes', '2',
           '-m', 'timm_noisystudent', *_train(data_root, tmp_path / 'out')]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(ACCELERATE_USE_CPU='1'), timeout=300)
    assert proc.returncode != 0
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith('error:')]
    assert len(ours) == 1 and 'FSDP shards a model over accelerators' in ours[0] and '--multi_gpu' in ours[0], \
        proc.stderr[-3000:]
    assert 'RuntimeError' not in proc.stderr


# --- 7. privacy and permissions ------------------------------------------------------------------------

def test_push_private_to_an_existing_public_repo_is_refused(model_dir, hub_server, capsys):
    repo = hub_server.unique_repo_id('public')
    hub_server.create_repo('model', repo, private=False)
    before = len(hub_server.commits('model', repo))
    assert main(['push', str(model_dir), '--repo-id', repo, '--private']) == 2
    assert 'exists and is public' in _error_line(capsys.readouterr().err)
    assert len(hub_server.commits('model', repo)) == before
    assert main(['push', str(model_dir), '--repo-id', repo]) == 0


def test_a_pull_request_of_unchanged_files_says_nothing_was_pushed(model_dir, hub_server, capsys):
    repo = hub_server.unique_repo_id('same')
    assert main(['push', str(model_dir), '--repo-id', repo]) == 0
    capsys.readouterr()
    before = len(hub_server.commits('model', repo))
    assert main(['push', str(model_dir), '--repo-id', repo, '--create-pr']) == 0
    out = capsys.readouterr().out
    assert f"nothing to push: {model_dir}'s files equal those on main of {repo}; no pull request opened" in out
    assert 'pushed' not in out and len(hub_server.commits('model', repo)) == before


def test_pushed_stats_carry_no_local_paths(data_root, model_dir, hub_server, tmp_path, capsys):
    unl = _unlabeled_copy(data_root, tmp_path / 'unl', n=16)
    labels = tmp_path / 'labels'
    assert main(_label(model_dir, unl, labels)) == 0
    repo = hub_server.unique_repo_id('labels')
    assert main(['push-labels', str(labels), '--repo-id', repo]) == 0
    files = hub_server.files('dataset', repo)
    stats = json.loads(files['stats.json'])
    text = files['stats.json'].decode()
    assert str(tmp_path) not in text and '/tmp' not in text and str(Path.home()) not in text.replace('"/', '"')
    assert stats['source']['path'] == 'unl' and stats['teacher']['spec'] == 'model'
    assert 'resolved' not in stats['source'] and stats['source_identity']['rows'] == 16


def test_an_export_follows_the_umask(model_dir, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(['export', str(model_dir), str(tmp_path / 'exp')]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / 'exp').stat().st_mode & 0o777 == 0o755


def test_trained_weights_have_the_mode_of_their_config_json(data_root, tmp_path):
    old = os.umask(0o002)
    try:
        assert main(_train(data_root, tmp_path / 'out', '--max-steps', '2', '--checkpoint-every', '1')) == 0
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    model = tmp_path / 'out' / 'model'
    assert mode(model / 'config.json') == mode(model / 'model.safetensors') == 0o664
    checkpoint = sorted((tmp_path / 'out' / 'checkpoints').glob('step-*'))[-1]
    assert {p.name: mode(p) for p in checkpoint.glob('*.safetensors')} == \
        {'model.safetensors': 0o664, 'ema.safetensors': 0o664}


# --- also --------------------------------------------------------------------------------------------

def test_every_flag_has_help():
    import argparse
    from timm_noisystudent.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f'{name} {action.option_strings or action.dest}' for name, p in sub.choices.items()
               for action in p._actions if not action.help]
    assert missing == []


def test_labels_of_a_stream_are_checked_by_their_first_rows(data_root, model_dir, tmp_path, capsys):
    unl = _unlabeled_copy(data_root, tmp_path / 'unl', n=24)
    other = tmp_path / 'other'
    other.mkdir()
    for i, f in enumerate(sorted((data_root / 'unlabeled').iterdir())[100:124]):
        shutil.copy(f, other / sorted(p.name for p in unl.iterdir())[i])
    assert main(_label(model_dir, unl, tmp_path / 'labels', '--streaming')) == 0
    identity = json.loads((tmp_path / 'labels' / 'stats.json').read_text())['source_identity']
    assert identity['rows'] == 24 and identity['head_sha256']
    capsys.readouterr()
    assert main(_train(data_root, tmp_path / 'student', '--pseudo', str(tmp_path / 'labels'),
                       '--unlabeled-data', str(other))) == 2
    assert 'its images differ' in _error_line(capsys.readouterr().err)
    assert main(_train(data_root, tmp_path / 'student', '--pseudo', str(tmp_path / 'labels'),
                       '--unlabeled-data', str(unl))) == 0


# --- issue 14: sources resolved once, image folders listed at scandir speed ------------------------

def _folder_as_datasets_reads_it(path):
    import datasets
    return datasets.load_dataset(str(path), split='train')


def test_the_folder_index_reads_a_folder_as_datasets_does(data_root, tmp_path):
    from timm_noisystudent.data import load_source
    root = tmp_path / 'nested'
    for cls in ('cat', 'dog', 'eel'):
        (root / cls).mkdir(parents=True)
    files = sorted((data_root / 'unlabeled').iterdir())
    for i, f in enumerate(files[:9]):
        shutil.copy(f, root / ('cat', 'dog', 'eel')[i % 3] / f'{i:03d}{".PNG" if i == 4 else ".png"}')
    (root / 'cat' / '.hidden.png').write_bytes(files[10].read_bytes())
    (root / 'dog' / 'notes.md').write_text('not an image')
    ours = load_source(str(root))
    theirs = _folder_as_datasets_reads_it(root)
    assert str(ours.features) == str(theirs.features) and len(ours) == len(theirs) == 9
    assert ours['label'] == theirs['label']
    import datasets
    paths = lambda ds: [v['path'] for v in ds.cast_column('image', datasets.Image(decode=False))['image']]  # noqa
    assert paths(ours) == paths(theirs)
    sliced = load_source({'path': str(root), 'split': 'train[2:5]'})
    assert paths(sliced) == paths(theirs)[2:5]


def test_a_file_name_with_a_newline_is_listed(data_root, tmp_path, model_dir, capsys):
    unl = _unlabeled_copy(data_root, tmp_path / 'unl', n=8)
    shutil.copy(sorted((data_root / 'unlabeled').iterdir())[20], unl / 'odd\nname.png')
    assert main(_label(model_dir, unl, tmp_path / 'labels')) == 0
    assert 'labeled 9 images (0 undecodable' in capsys.readouterr().out


def test_a_file_name_that_is_not_utf8_is_left_out_with_one_warning(data_root, tmp_path, model_dir, capsys):
    unl = _unlabeled_copy(data_root, tmp_path / 'unl', n=8)
    odd = os.fsdecode(b'0003-odd\xff\xfe.png')  # sorts among the others; bytes that are not UTF-8
    try:
        shutil.copy(sorted((data_root / 'unlabeled').iterdir())[20], unl / odd)
    except (OSError, UnicodeEncodeError):
        pytest.skip('this file system refuses names that are not UTF-8')
    assert main(_label(model_dir, unl, tmp_path / 'labels')) == 0
    captured = capsys.readouterr()
    assert 'labeled 8 images (0 undecodable' in captured.out and 'Traceback' not in captured.err
    assert ('left out 1 image file(s) whose name is not valid UTF-8, such as "0003-odd\\xff\\xfe.png"'
            in captured.err)
    stats = json.loads((tmp_path / 'labels' / 'stats.json').read_text())
    assert stats['source_identity']['rows'] == 8
    # the same rows again, so the labels pair with them
    assert main(_train(data_root, tmp_path / 'student', '--pseudo', str(tmp_path / 'labels'),
                       '--max-steps', '1')) == 0
    (unl / odd).rename(unl / '0003-odd.png')
    assert main(_train(data_root, tmp_path / 'student2', '--pseudo', str(tmp_path / 'labels'),
                       '--max-steps', '1')) == 2
    assert 'rows' in _error_line(capsys.readouterr().err)
    for f in unl.iterdir():
        if f.name != '0003-odd.png':
            f.unlink()
    (unl / '0003-odd.png').rename(unl / odd)
    assert main(_label(model_dir, unl, tmp_path / 'labels2')) == 2
    assert 'names of its 1 image file(s) are not valid UTF-8' in _error_line(capsys.readouterr().err)


def test_a_folder_with_metadata_is_read_by_datasets(data_root, tmp_path):
    from timm_noisystudent.data import load_source
    root = _unlabeled_copy(data_root, tmp_path / 'meta', n=4)
    names = sorted(p.name for p in root.iterdir())
    (root / 'metadata.csv').write_text('file_name,caption\n' + ''.join(f'{n},c{i}\n' for i, n in enumerate(names)))
    ds = load_source(str(root))
    assert 'caption' in ds.column_names and len(ds) == 4


def test_a_run_resolves_each_source_once(data_root, tmp_path, capsys):
    from timm_noisystudent import data
    data.RESOLUTIONS.clear()
    bars_before = datasets.is_progress_bar_enabled()
    cfg = {
        'labeled': str(data_root / 'labeled'), 'unlabeled': str(_unlabeled_copy(data_root, tmp_path / 'unl', 32)),
        'eval': str(data_root / 'test'),
        'teacher': {'model': MODEL, 'epochs': 1, 'image_size': 32},
        'students': [{'model': MODEL, 'epochs': 1}, {'model': MODEL, 'epochs': 1}],
        'labels': {'threshold': 0.0, 'batch_size': 8, 'mixed_precision': 'no'},
        'train': {'batch_size': 8, 'num_workers': 0, 'mixed_precision': 'no', 'min_steps': 0},
        'output': str(tmp_path / 'run'),
    }
    (tmp_path / 'run.yaml').write_text(yaml.safe_dump(cfg))
    assert main(['run', str(tmp_path / 'run.yaml'), '--no-progress']) == 0
    err = capsys.readouterr().err
    assert 'indexing' not in err and 'files/s' not in err  # --no-progress: no bar, the index's included
    assert datasets.is_progress_bar_enabled() == bars_before
    counts = {key[0]: n for key, n in data.RESOLUTIONS.items()}
    assert counts == {cfg['labeled']: 1, cfg['unlabeled']: 1, cfg['eval']: 1}  # 5 stages, 3 sources, 3 resolutions
    index = tmp_path / 'run' / 'sources' / 'unlabeled'
    assert json.loads((index / 'source.json').read_text())['rows'] == 32


def test_under_accelerate_launch_rank_0_holds_the_lock_and_both_ranks_stop(data_root, tmp_path):
    out = tmp_path / 'out'
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import sys, time; from timm_noisystudent.files import output_lock\n'
         'with output_lock(sys.argv[1]):\n    print("held", flush=True); time.sleep(120)', str(out)],
        stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == 'held'
        launch = [str(Path(sys.executable).with_name('accelerate')), 'launch', '--multi_gpu', '--num_processes',
                  '2', '--main_process_port', '0', '-m', 'timm_noisystudent']
        proc = subprocess.run(launch + _train(data_root, out), capture_output=True, text=True, timeout=300,
                              env={**_env(), 'ACCELERATE_USE_CPU': '1'})
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith('error:')]
    assert len(ours) == 1 and f'is in use by another noisystudent process (pid {holder.pid})' in ours[0]
    assert not (out / 'model').exists()
