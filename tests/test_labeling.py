"""Pseudo-labeling and data selection, on scikit-learn digits with timm's tiny test_efficientnet.

The teacher is test_efficientnet at 32 px with a ridge-regression head fitted on 100 digits, so
its labels on the other 160 are mostly right and its confidences spread over (0.2, 0.95).
"""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from digits import digits_arrays, write_parquet
from timm_noisystudent.cli import main
from timm_noisystudent.config import DataSource, LabelsConfig, UserError
from timm_noisystudent.labeling import _label_streaming, _Labeler, label, raw_files, select, selection_notes
from timm_noisystudent.models import data_config_of, save_model

N_FIT, N_UNLABELED = 100, 160
REFERENCE = dict(batch_size=16, mixed_precision='no')  # default threshold and balancing


def _env():
    from conftest import hub_env
    return hub_env(OMP_NUM_THREADS='1', PYTHONPATH=str(Path(__file__).parent))


def _rows(path: Path, sub: str = 'data') -> datasets.Dataset:
    files = sorted(str(f) for f in (path / sub).glob('*.parquet'))
    rows = datasets.load_dataset('parquet', data_files=files, split='train')
    return rows.select(np.argsort(rows['index'], kind='stable'))


def _same_rows(a: datasets.Dataset, b: datasets.Dataset, atol: float = 1e-5) -> None:
    assert a['index'] == b['index']
    assert a['label'] == b['label']
    np.testing.assert_allclose(np.asarray(a['probs']), np.asarray(b['probs']), atol=atol)
    np.testing.assert_allclose(np.asarray(a['confidence']), np.asarray(b['confidence']), atol=atol)


@pytest.fixture(scope='module')
def digits():
    return digits_arrays(32)


@pytest.fixture(scope='module')
def teacher(digits):
    """test_efficientnet with a ridge head on frozen random features: a weak but real teacher."""
    images, labels = digits
    torch.manual_seed(0)
    model = timm.create_model('test_efficientnet', num_classes=10).eval()
    transform = timm.data.create_transform(**data_config_of(model, 32))
    x = torch.stack([transform(Image.fromarray(i)) for i in images[:N_FIT]])
    with torch.no_grad():
        f = model.forward_head(model.forward_features(x), pre_logits=True).double()
    mu, sd = f.mean(0), f.std(0) + 1e-6
    a = torch.cat([(f - mu) / sd, torch.ones(len(f), 1, dtype=torch.double)], 1)
    y = torch.nn.functional.one_hot(torch.as_tensor(labels[:N_FIT]), 10).double()
    w = torch.linalg.solve(a.T @ a + torch.eye(a.shape[1], dtype=torch.double), a.T @ y) * 4.0
    with torch.no_grad():
        model.classifier.weight.copy_((w[:-1] / sd[:, None]).T)
        model.classifier.bias.copy_(w[-1] - (mu / sd) @ w[:-1])
    return model


@pytest.fixture(scope='module')
def teacher_dir(teacher, tmp_path_factory):
    return save_model(teacher, tmp_path_factory.mktemp('teacher') / 'model',
                      label_names=[f'digit_{i}' for i in range(10)], data_config=data_config_of(teacher, 32))


@pytest.fixture(scope='module')
def unlabeled(digits, tmp_path_factory):
    images, _ = digits
    return write_parquet(tmp_path_factory.mktemp('unlabeled'), images[N_FIT:N_FIT + N_UNLABELED])


@pytest.fixture(scope='module')
def reference(teacher_dir, unlabeled, tmp_path_factory):
    out = tmp_path_factory.mktemp('reference') / 'labels'
    stats = label(teacher_dir, unlabeled, out, LabelsConfig(**REFERENCE), num_workers=0, progress=False,
                  rows_per_shard=32)
    return out, stats


def _direct_logits(teacher, digits) -> torch.Tensor:
    images, _ = digits
    transform = timm.data.create_transform(**data_config_of(teacher, 32))
    x = torch.stack([transform(Image.fromarray(i)) for i in images[N_FIT:N_FIT + N_UNLABELED]])
    with torch.inference_mode():
        return teacher.eval()(x)


# --- labeling ------------------------------------------------------------------------------------

def test_labels_match_a_direct_timm_forward_pass(reference, teacher, digits):
    out, stats = reference
    raw = _rows(out, 'raw')
    assert raw['index'] == list(range(N_UNLABELED))
    probs = _direct_logits(teacher, digits).softmax(-1).numpy()
    np.testing.assert_allclose(np.asarray(raw['probs']), probs, atol=1e-5)
    assert raw['label'] == probs.argmax(-1).tolist()
    np.testing.assert_allclose(raw['confidence'], probs.max(-1), atol=1e-5)
    # the teacher is a real one: most labels are right
    assert (np.asarray(raw['label']) == digits[1][N_FIT:N_FIT + N_UNLABELED]).mean() > 0.7
    assert stats['rows_labeled'] == N_UNLABELED and stats['rows_labeled_now'] == N_UNLABELED
    assert stats['failed_count'] == 0 and stats['failed_images'] == []


def test_output_directory_format(reference, teacher, unlabeled):
    out, stats = reference
    data = _rows(out)
    assert data.features == datasets.Features({
        'index': datasets.Value('int64'), 'probs': datasets.List(datasets.Value('float32')),
        'label': datasets.Value('int64'), 'confidence': datasets.Value('float32')})
    assert len(data) == stats['rows_after']
    # rows below the threshold only where a class was short of N and filled from its most confident
    below = {lab for lab, c in zip(data['label'], data['confidence']) if c < 0.3}
    assert below <= set(stats['filled_classes'])
    assert all(len(p) == 10 for p in data['probs'])
    on_disk = json.loads((out / 'stats.json').read_text())
    assert on_disk == stats
    # the engine re-opens the unlabeled set from these keys
    assert DataSource(**stats['source']).path == str(unlabeled)
    assert stats['source']['image_column'] == 'image'
    assert stats['source_fingerprint']
    assert stats['teacher']['spec'].endswith('model')
    from timm_noisystudent.labeling import weights_sha256
    assert stats['teacher']['weights_sha256'] == weights_sha256(teacher)
    for key in ('num_classes', 'label_names', 'soft', 'temperature', 'threshold', 'per_class_target',
                'counts_before', 'counts_after', 'rows_before', 'rows_after', 'duplicated', 'seconds',
                'img_per_s', 'mixed_precision', 'agreement_bf16_fp32', 'seed'):
        assert key in stats, key
    assert stats['label_names'][3] == 'digit_3'
    assert sum(stats['counts_after']) == stats['rows_after']
    assert stats['counts_after'] == [stats['per_class_target'] if n else 0 for n in stats['counts_labeled']]
    with Image.open(out / 'confidence.png') as img:
        assert img.size[0] > 400
    assert not list(out.rglob('.*tmp*'))
    from timm_noisystudent.data import read_pseudo
    table, read_stats = read_pseudo(out)
    assert len(table) == stats['rows_after'] and read_stats == stats


def test_temperature_and_hard_labels(teacher_dir, unlabeled, teacher, digits, tmp_path):
    out = tmp_path / 'labels'
    cfg = dict(batch_size=32, mixed_precision='no', threshold=0.0, per_class='none')
    soft = label(teacher_dir, unlabeled, out, LabelsConfig(temperature=2.0, **cfg), num_workers=0, progress=False)
    logits = _direct_logits(teacher, digits)
    rows = _rows(out)
    np.testing.assert_allclose(np.asarray(rows['probs']), (logits / 2).softmax(-1).numpy(), atol=1e-5)
    assert soft['temperature'] == 2.0 and soft['soft'] is True and soft['rows_after'] == N_UNLABELED
    # hard labels only re-select: the raw shards are reused
    hard = label(teacher_dir, unlabeled, out, LabelsConfig(temperature=2.0, soft=False, **cfg), num_workers=0,
                 progress=False)
    assert hard['soft'] is False and hard['rows_resumed'] == N_UNLABELED and hard['rows_labeled_now'] == 0
    hard_rows = _rows(out)
    onehot = np.eye(10, dtype=np.float32)[logits.argmax(-1).numpy()]
    np.testing.assert_array_equal(np.asarray(hard_rows['probs']), onehot)
    assert hard_rows['label'] == rows['label'] and hard_rows['confidence'] == rows['confidence']
    # a new temperature changes the labels: the raw shards are discarded and made again
    with pytest.warns(UserWarning, match='discarding'):
        t1 = label(teacher_dir, unlabeled, out, LabelsConfig(**cfg), num_workers=0, progress=False)
    assert t1['rows_labeled_now'] == N_UNLABELED
    np.testing.assert_allclose(np.asarray(_rows(out)['probs']), logits.softmax(-1).numpy(), atol=1e-5)


def test_topk_format(teacher_dir, unlabeled, reference, tmp_path):
    out = tmp_path / 'labels'
    stats = label(teacher_dir, DataSource(path=str(unlabeled), split='train[:48]'), out,
                  LabelsConfig(topk=3, threshold=0.0, per_class='none', **REFERENCE), num_workers=0, progress=False)
    assert stats['format'] == 'topk' and stats['topk'] == 3
    rows = _rows(out)
    assert set(rows.column_names) == {'index', 'topk_idx', 'topk_prob', 'label', 'confidence'}
    full = np.asarray(_rows(reference[0], 'raw')['probs'])[:48]
    np.testing.assert_array_equal(np.asarray(rows['topk_idx']), np.argsort(-full, axis=1)[:, :3])
    np.testing.assert_allclose(np.asarray(rows['topk_prob']), -np.sort(-full, axis=1)[:, :3], atol=1e-5)
    assert rows['label'] == [i[0] for i in rows['topk_idx']]


def test_many_classes_store_topk_by_default(unlabeled, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('test_efficientnet', num_classes=120)
    stats = label(model, DataSource(path=str(unlabeled), split='train[:16]'), tmp_path / 'labels',
                  LabelsConfig(threshold=0.0, per_class='none', **REFERENCE), num_workers=0, progress=False,
                  image_size=32)
    assert stats['format'] == 'topk' and stats['topk'] == 10 and stats['num_classes'] == 120
    assert stats['source']['split'] == 'train[:16]' and stats['rows_labeled'] == 16
    assert all(len(i) == 10 for i in _rows(tmp_path / 'labels')['topk_idx'])


def test_a_strict_threshold_warns_and_keeps_what_it_can(reference, teacher_dir, unlabeled, tmp_path):
    out = tmp_path / 'labels'
    shutil.copytree(reference[0], out)
    with pytest.warns(UserWarning, match=r'threshold 0.9 kept \d+ of 160'):
        stats = label(teacher_dir, unlabeled, out, LabelsConfig(threshold=0.9, **REFERENCE), num_workers=0,
                      progress=False, rows_per_shard=32)
    assert stats['rows_labeled_now'] == 0 and 0 < stats['rows_before'] < N_UNLABELED // 2
    # the classes short of N were filled with their most confident rows below the threshold
    assert stats['warnings'] and stats['filled_classes'] and stats['rows_below_threshold'] > 0
    assert stats['rows_after'] >= N_UNLABELED // 2 - 10
    strict = label(teacher_dir, unlabeled, out, LabelsConfig(threshold=0.9, fill=False, **REFERENCE),
                   num_workers=0, progress=False, rows_per_shard=32)
    assert min(_rows(out)['confidence']) >= 0.9 and strict['filled_classes'] == []
    # a threshold nothing passes still leaves the student half the set, and says so
    with pytest.warns(UserWarning, match='kept 0 of 160'):
        filled = label(teacher_dir, unlabeled, out, LabelsConfig(threshold=1.0, **REFERENCE), num_workers=0,
                       progress=False, rows_per_shard=32)
    assert filled['rows_before'] == 0 and filled['rows_after'] >= N_UNLABELED // 2 - 10
    with pytest.warns(UserWarning, match='kept 0 of 160'):
        none = label(teacher_dir, unlabeled, out, LabelsConfig(threshold=1.0, fill=False, **REFERENCE),
                     num_workers=0, progress=False, rows_per_shard=32)
    assert none['rows_after'] == 0
    # still the same columns, though datasets refuses to load a split of zero rows
    empty = [pq.read_table(f) for f in (out / 'data').glob('*.parquet')]
    assert [t.num_rows for t in empty] == [0] and empty[0].column_names == ['index', 'probs', 'label', 'confidence']


def _corrupt_dataset(digits) -> datasets.Dataset:
    images, _ = digits
    values = []
    for img in images[:20]:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format='PNG')
        values.append({'bytes': buf.getvalue(), 'path': None})
    values[3] = {'bytes': b'not an image at all', 'path': None}
    values[7] = {'bytes': values[7]['bytes'][:40], 'path': None}  # truncated PNG
    for i in range(12, 16):  # one whole batch that cannot be decoded
        values[i] = {'bytes': b'\x89PNG\r\n\x1a\n broken', 'path': None}
    return datasets.Dataset.from_dict({'image': values}, features=datasets.Features({'image': datasets.Image()}))


def test_undecodable_images_are_skipped_counted_and_listed(digits, teacher_dir, tmp_path):
    bad = [3, 7, 12, 13, 14, 15]
    stats = label(teacher_dir, _corrupt_dataset(digits), tmp_path / 'labels',
                  LabelsConfig(batch_size=4, mixed_precision='no', threshold=0.0, per_class='none'),
                  num_workers=0, progress=False, rows_per_shard=8)
    assert stats['failed_images'] == bad and stats['failed_count'] == len(bad)
    assert stats['rows_labeled'] == 20 - len(bad)
    assert stats['source'] is None  # an in-memory Dataset has no path to re-open
    assert _rows(tmp_path / 'labels')['index'] == [i for i in range(20) if i not in bad]


# --- streaming and distributed -------------------------------------------------------------------

def test_streaming_input_matches_map_style_and_resumes(reference, teacher_dir, unlabeled, tmp_path):
    out = tmp_path / 'labels'
    source = DataSource(path=str(unlabeled), streaming=True)
    stats = label(teacher_dir, source, out, LabelsConfig(**REFERENCE), num_workers=0, progress=False,
                  rows_per_shard=48)
    assert stats['source']['streaming'] is True and stats['source_fingerprint'] is None
    assert len(raw_files(out)) == 4  # 48 + 48 + 48 + 16 rows
    _same_rows(_rows(out, 'raw'), _rows(reference[0], 'raw'))
    _same_rows(_rows(out), _rows(reference[0]))
    assert stats['counts_after'] == reference[1]['counts_after']
    # lose the last two shards, as a killed run would: only their rows are labeled again
    for f in raw_files(out)[-2:]:
        f.unlink()
    again = label(teacher_dir, source, out, LabelsConfig(**REFERENCE), num_workers=0, progress=False,
                  rows_per_shard=48)
    assert again['rows_resumed'] == 96 and again['rows_labeled_now'] == 64
    _same_rows(_rows(out), _rows(reference[0]))


def test_a_streamed_source_splits_by_node_into_disjoint_covering_shards(reference, teacher, unlabeled, tmp_path):
    """Each of two ranks labels its split of the stream; together they hold every row once."""
    from timm_noisystudent.runtime import make_accelerator
    raw = tmp_path / 'raw'
    raw.mkdir()
    ds = datasets.load_dataset(str(unlabeled), split='train', streaming=True)
    transform = timm.data.create_transform(**data_config_of(teacher, 32))
    seen = []

    class _Bar:
        total = None

        def update(self, n):
            pass

    for rank in range(2):
        labeler = _Labeler(teacher.eval(), make_accelerator('no'), 1.0, None, check_agreement=False)
        n = _label_streaming(ds, 'image', transform, labeler, raw, 16, 32, 0, rank, 2, _Bar())
        mine = [f for f in raw_files(tmp_path) if f'-r{rank:03d}-' in f.name]
        seen.append(np.concatenate([pq.read_table(f).column('index').to_numpy() for f in mine]))
        assert n == N_UNLABELED // 2 and (seen[-1] % 2 == rank).all()
    union = np.sort(np.concatenate(seen))
    np.testing.assert_array_equal(union, np.arange(N_UNLABELED))
    ref = _rows(reference[0], 'raw')
    got = datasets.Dataset.from_dict(pq.read_table(raw_files(tmp_path)[0]).to_pydict())
    np.testing.assert_allclose(np.asarray(got['probs']), np.asarray(ref.select(got['index'])['probs']), atol=1e-5)


def _label_cmd(teacher_dir, unlabeled, out, *extra):
    return ['label', '--teacher', str(teacher_dir), '--data', str(unlabeled), '--output', str(out),
            '--batch-size', '16', '--mixed-precision', 'no', '--num-workers', '0', *extra]


def test_two_processes_equal_one(reference, teacher_dir, unlabeled, tmp_path):
    out = tmp_path / 'labels'
    cmd = [str(Path(sys.executable).parent / 'accelerate'), 'launch', '--multi_gpu', '--num_processes', '2',
           '--main_process_port', '0', '-m', 'timm_noisystudent',
           *_label_cmd(teacher_dir, unlabeled, out, '--rows-per-shard', '32')]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), 'ACCELERATE_USE_CPU': '1'},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('labeled 160 images') == 1  # only the main process talks
    stats = json.loads((out / 'stats.json').read_text())
    assert stats['num_processes'] == 2
    raw = _rows(out, 'raw')
    assert raw['index'] == list(range(N_UNLABELED))  # no duplicates from padding, no row lost
    _same_rows(raw, _rows(reference[0], 'raw'))
    _same_rows(_rows(out), _rows(reference[0]))
    assert {k: stats[k] for k in ('counts_before', 'counts_after', 'per_class_target', 'duplicated')} == \
        {k: reference[1][k] for k in ('counts_before', 'counts_after', 'per_class_target', 'duplicated')}


_SLOW_SHARDS = '''
import sys, time
from timm_noisystudent import labeling
from timm_noisystudent.cli import main
write = labeling._Shard.write
def slow_write(self):
    n = write(self)
    time.sleep(0.5)
    return n
labeling._Shard.write = slow_write
sys.exit(main(sys.argv[1:]))
'''


def test_resume_after_a_kill_labels_only_the_missing_rows(reference, teacher_dir, unlabeled, tmp_path):
    out = tmp_path / 'labels'
    cmd = [sys.executable, '-c', _SLOW_SHARDS, *_label_cmd(teacher_dir, unlabeled, out, '--rows-per-shard', '16')]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        deadline = time.monotonic() + 240
        while len(raw_files(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    kept = raw_files(out)
    assert 2 <= len(kept) < 10 and not (out / 'stats.json').exists()
    (out / 'raw' / '.rows-000000000144-000000000160.parquet.tmp-99999').write_bytes(b'half a file')
    stats = label(teacher_dir, unlabeled, out, LabelsConfig(**REFERENCE), num_workers=0, progress=False,
                  rows_per_shard=16)
    assert stats['rows_resumed'] == 16 * len(kept) and stats['rows_labeled_now'] == N_UNLABELED - 16 * len(kept)
    assert [f.stat().st_mtime_ns for f in kept] == [f.stat().st_mtime_ns for f in raw_files(out)[:len(kept)]]
    assert not list((out / 'raw').glob('.*'))
    _same_rows(_rows(out, 'raw'), _rows(reference[0], 'raw'))
    _same_rows(_rows(out), _rows(reference[0]))


def test_bf16_labels_agree_with_fp32(reference, teacher_dir, unlabeled, tmp_path):
    stats = label(teacher_dir, DataSource(path=str(unlabeled), split='train[:64]'), tmp_path / 'labels',
                  LabelsConfig(batch_size=32, mixed_precision='bf16', threshold=0.0, per_class='none'),
                  num_workers=0, progress=False)
    assert stats['mixed_precision'] == 'bf16'
    assert stats['agreement_sample'] == 64 and stats['agreement_bf16_fp32'] >= 0.9
    ref = _rows(reference[0], 'raw').select(range(64))
    rows = _rows(tmp_path / 'labels', 'raw')
    assert np.mean(np.asarray(rows['label']) == np.asarray(ref['label'])) >= 0.9
    np.testing.assert_allclose(np.asarray(rows['probs']), np.asarray(ref['probs']), atol=0.1)


def test_cli_rejects_bad_settings_in_one_line(capsys, tmp_path):
    assert main(['label', '--teacher', 'x', '--data', str(tmp_path), '--output', str(tmp_path / 'o'),
                 '--threshold', '1.5']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: threshold must be between 0 and 1') and err.count('\n') == 1
    assert main(['label', '--teacher', 'x', '--data', str(tmp_path), '--output', str(tmp_path / 'o'),
                 '--per-class', 'many']) == 2
    assert 'per_class' in capsys.readouterr().err


# --- selection -----------------------------------------------------------------------------------

@st.composite
def _label_sets(draw):
    num_classes = draw(st.integers(1, 6))
    n = draw(st.integers(0, 60))
    labels = draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n))
    # a few distinct values make ties common
    conf = draw(st.lists(st.one_of(st.sampled_from([0.0, 0.25, 0.3, 0.5, 1.0]), st.floats(0, 1, width=32)),
                         min_size=n, max_size=n))
    threshold = draw(st.one_of(st.sampled_from([0.0, 0.3, 1.0]), st.floats(0, 1)))
    per_class = draw(st.one_of(st.sampled_from(['auto', 'none']), st.integers(1, 25)))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    fill = draw(st.booleans())
    return (np.asarray(labels, np.int64), np.asarray(conf, np.float32), num_classes, threshold, per_class, seed,
            fill)


@settings(max_examples=400, deadline=None)
@given(_label_sets())
def test_selection_properties(case):
    labels, conf, num_classes, threshold, per_class, seed, fill = case
    picked, stats = select({'label': labels, 'confidence': conf}, num_classes, threshold, per_class, seed, fill=fill)
    # a duplicated row is a copy of a real row, and positions come back in order
    assert picked.dtype == np.int64 and (np.diff(picked) >= 0).all()
    assert ((picked >= 0) & (picked < labels.size)).all()
    above = conf >= threshold
    before = np.bincount(labels[above], minlength=num_classes)
    present = np.bincount(labels, minlength=num_classes)
    after = np.bincount(labels[picked], minlength=num_classes)
    assert stats['counts_before'] == before.tolist() and stats['counts_after'] == after.tolist()
    assert stats['rows_after'] == picked.size and stats['duplicated'] == picked.size - np.unique(picked).size
    assert stats['rows_below_threshold'] == int((~above[np.unique(picked)]).sum())
    assert stats['empty_classes'] == np.flatnonzero(after == 0).tolist()
    target = stats['per_class_target']
    if per_class == 'none':
        assert target is None
        np.testing.assert_array_equal(picked, np.flatnonzero(above))
        return
    if per_class == 'auto':
        median = int(np.floor(np.median(before[before > 0]) + 0.5)) if before.any() else 0
        # never below half an even share of the labeled rows: a weak teacher cannot starve the student
        assert target == max(median, int(np.ceil(labels.size / (2 * num_classes))))
    # classes are balanced to N exactly; a class with no row at all stays empty, and so does a class
    # with no row above the threshold unless filling is on
    np.testing.assert_array_equal(after, np.where((present if fill else before) > 0, target, 0))
    below_used = set(np.unique(picked[~above[picked]]).tolist())
    if not fill:
        assert not below_used and stats['filled_classes'] == []
    for c in np.flatnonzero(after):
        rows = np.flatnonzero(labels == c)
        copies = np.array([(picked == r).sum() for r in rows])
        used = rows[copies > 0]
        # the class's rows above the threshold come first, then its most confident below it
        if any(r in below_used for r in used):
            assert c in stats['filled_classes'] and before[c] < target
            assert (copies[above[rows]] > 0).all()
        assert c not in stats['filled_classes'] or any(r in below_used for r in used)
        if (copies == 0).any():
            assert np.nan_to_num(conf[used], nan=-1).min() >= np.nan_to_num(conf[rows[copies == 0]], nan=-1).max()
        n = used.size
        if n >= target:  # the N most confident, once each
            assert copies.max() == 1
        else:  # floor(N/n) copies each, plus one more for N mod n of them
            assert set(copies[copies > 0].tolist()) <= {target // n, target // n + 1}
            assert (copies == target // n + 1).sum() == target % n
    # the same seed gives the same result
    again, again_stats = select({'label': labels, 'confidence': conf}, num_classes, threshold, per_class, seed,
                                fill=fill)
    np.testing.assert_array_equal(picked, again)
    assert again_stats == stats


def test_a_class_short_of_its_share_keeps_its_most_confident_rows():
    # the 10-epoch-teacher case: the threshold keeps almost nothing, classes are filled from below it
    labels = np.array([0] * 6 + [1] * 6)
    conf = np.array([0.9, 0.2, 0.25, 0.1, 0.15, 0.05] + [0.28, 0.27, 0.26, 0.01, 0.02, 0.03], np.float32)
    picked, stats = select((labels, conf), 2, threshold=0.3, per_class='auto')
    # auto: the median above the threshold (1) is raised to half an even share (12 / 4 = 3)
    assert stats['per_class_target'] == 3 and stats['rows_before'] == 1
    assert picked.tolist() == [0, 1, 2, 6, 7, 8]
    assert stats['filled_classes'] == [0, 1] and stats['rows_below_threshold'] == 5
    assert selection_notes(stats, ['cat', 'dog'])[0].startswith('the threshold 0.3 kept 1 of 12 images (8.3%); 2 classes')
    strict, strict_stats = select((labels, conf), 2, threshold=0.3, per_class='auto', fill=False)
    assert strict.tolist() == [0, 0, 0] and strict_stats['empty_classes'] == [1]
    assert any('no pseudo-labeled image was kept for dog' in n for n in selection_notes(strict_stats, ['cat', 'dog']))
    # one class short of its share: the note speaks of one class
    one, one_stats = select((labels, np.where(labels == 0, 0.9, conf).astype(np.float32)), 2, threshold=0.3,
                            per_class='auto')
    assert one_stats['filled_classes'] == [1]
    assert '; 1 class short of N=6 was filled with its most confident rows below it (6 rows): dog.' in \
        selection_notes(one_stats, ['cat', 'dog'])[0]
    # one row below the threshold and one duplicate: each note speaks of one row
    few, few_stats = select((np.array([0, 0, 0, 1, 1, 1, 2, 2]), np.array([.9, .9, .9, .9, .9, .1, .9, .9], np.float32)),
                            3, threshold=0.3, per_class=3)
    assert few.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 7]
    assert selection_notes(few_stats, ['a', 'b', 'c']) == [
        'the threshold 0.3 kept 7 of 8 images (87.5%); 1 class short of N=3 was filled with its most confident rows '
        'below it (1 row): b.',
        '1 selected row is a duplicate of classes with fewer than N=3 images in all.']


def test_each_row_gets_the_extra_copy_with_probability_n_mod_n_over_n():
    labels = np.zeros(4, np.int64)
    conf = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    extra = np.zeros(4)
    for seed in range(400):
        picked, _ = select((labels, conf), 1, 0.3, per_class=6, seed=seed)
        extra += np.bincount(picked, minlength=4) - 1  # 6 = 4 * 1 + 2: two rows get a second copy
    np.testing.assert_allclose(extra / 400, 0.5, atol=0.1)


def test_selection_accepts_a_table_and_orders_by_confidence():
    import pyarrow as pa
    table = pa.table({'label': [0, 0, 0, 1], 'confidence': pa.array([0.5, 0.9, 0.2, 0.4], pa.float32())})
    picked, stats = select(table, 2, threshold=0.3, per_class=1)
    assert picked.tolist() == [1, 3] and stats['counts_labeled'] == [3, 1]
    with pytest.raises(UserError, match='per_class'):
        select(table, 2, per_class=0)
