"""What a pseudo-label set holds is checked when a student opens it, and a loss that is no longer
finite stops a stage with one line instead of training a NaN model."""
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from timm_noisystudent.cli import main
from timm_noisystudent.demo import write_demo_data
from timm_noisystudent.models import load_model, save_model

MODEL = 'test_efficientnet'
COMMON = ['--num-workers', '0', '--mixed-precision', 'no', '--no-progress']


from conftest import error_line as _error_line  # noqa: E402


@pytest.fixture(scope='module')
def labels(tmp_path_factory):
    import torch
    root = tmp_path_factory.mktemp('values')
    write_demo_data(root / 'data', per_class=3, n_test=10)
    torch.manual_seed(0)
    teacher = save_model(load_model(MODEL, pretrained=False, num_classes=10), root / 'teacher',
                         label_names=[str(i) for i in range(10)],
                         data_config={'input_size': (3, 32, 32), 'crop_pct': 1.0, 'interpolation': 'bilinear',
                                      'mean': (0.5,) * 3, 'std': (0.5,) * 3})
    out = root / 'labels'
    assert main(['label', '--teacher', str(teacher), '--data', str(root / 'data' / 'unlabeled'), '--output',
                 str(out), '--threshold', '0', '--per-class', 'none', '--batch-size', '16', *COMMON]) == 0
    return root, out


def _tampered(labels_dir: Path, dest: Path, change) -> Path:
    shutil.copytree(labels_dir, dest)
    shard = sorted((dest / 'data').glob('*.parquet'))[0]
    table = pq.read_table(shard)
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    change(columns)
    pq.write_table(pa.table(columns, schema=table.schema), shard)
    return dest


def _set(name, row, value):
    def change(columns):
        columns[name][row] = value
    return change


CASES = {
    'nan': (_set('probs', 2, [float('nan')] * 10), 'a probability that is not finite or not in [0, 1] (row 2'),
    'sum50': (_set('probs', 0, [5.0] * 10), 'a probability that is not finite or not in [0, 1] (row 0'),
    'sum_half': (_set('probs', 1, [0.05] * 10), 'probabilities that sum to 0.5, not 1 (row 1'),
    'index': (_set('index', 3, 10 ** 6), 'a row index outside the unlabeled set of'),
    'short': (_set('probs', 0, [0.5, 0.5]), 'a probs list of another length than 10 (row 0'),
    'label': (_set('label', 0, 12), 'a class outside 0..9 (row 0'),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_a_student_refuses_pseudo_labels_no_labeler_writes(case, labels, tmp_path, capsys):
    root, labels_dir = labels
    change, expected = CASES[case]
    bad = _tampered(labels_dir, tmp_path / case, change)
    code = main(['train', '--data', str(root / 'data' / 'labeled'), '--model', MODEL, '--image-size', '32',
                 '--epochs', '1', '--batch-size', '8', '--min-steps', '0', '--pseudo', str(bad), '--output',
                 str(tmp_path / 'out'), *COMMON])
    assert code == 2
    line = _error_line(capsys.readouterr().err)
    assert expected in line and 'label again' in line, line
    assert not (tmp_path / 'out' / 'model').exists()


def test_the_untampered_labels_train(labels, tmp_path):
    root, labels_dir = labels
    assert main(['train', '--data', str(root / 'data' / 'labeled'), '--model', MODEL, '--image-size', '32',
                 '--epochs', '1', '--batch-size', '8', '--min-steps', '0', '--max-steps', '2', '--pseudo',
                 str(labels_dir), '--output', str(tmp_path / 'out'), *COMMON]) == 0


def test_a_loss_that_is_no_longer_finite_stops_the_stage_with_one_line(labels, tmp_path, capsys):
    root, _ = labels
    code = main(['train', '--data', str(root / 'data' / 'labeled'), '--model', MODEL, '--image-size', '32',
                 '--epochs', '50', '--batch-size', '8', '--min-steps', '0', '--lr', '1e30', '--clip-grad', '0',
                 '--output', str(tmp_path / 'out'), *COMMON])
    assert code == 2
    line = _error_line(capsys.readouterr().err)
    assert 'the training loss is not finite at step' in line and 'lower the lr' in line
    assert not (tmp_path / 'out' / 'model').exists()


def test_a_resume_with_other_settings_is_refused_naming_the_setting(labels, tmp_path, capsys):
    root, _ = labels
    base = ['train', '--data', str(root / 'data' / 'labeled'), '--model', MODEL, '--image-size', '32', '--epochs', '4',
            '--batch-size', '8', '--min-steps', '0', '--checkpoint-every', '2', '--output', str(tmp_path / 'out'),
            '--max-steps', '4', *COMMON]
    assert main(base) == 0
    (tmp_path / 'out' / 'metrics.json').unlink()  # as a killed stage leaves it: checkpoints, no metrics
    assert main(base + ['--lr', '1e-4', '--resume']) == 2
    line = _error_line(capsys.readouterr().err)
    assert 'were made with lr 0.006, not 0.0001' in line and 'remove them to start this stage over' in line
    assert main(base + ['--batch-size', '4', '--resume']) == 2
    assert 'batch_size 8, not 4' in _error_line(capsys.readouterr().err)
