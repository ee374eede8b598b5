"""The training engine on real tiny data: digits at 32 px with timm's test_efficientnet."""
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from digits import digits_arrays, split_indices, write_image_folder, write_parquet
from timm_noisystudent.config import DataSource, ModelStage, NoiseConfig, TrainConfig, UserError
from timm_noisystudent.data import decode_image, load_source, pseudo_batch_size
from timm_noisystudent.engine import evaluate_model, resolve_stage, train

MODEL = 'test_efficientnet'
CLI = [sys.executable, '-m', 'timm_noisystudent']


def _env():
    from conftest import hub_env
    return hub_env(OMP_NUM_THREADS='1', PYTHONPATH=str(Path(__file__).parent))


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp('digits')
    x, y = digits_arrays(32)
    split = split_indices(y, per_class=30, n_test=300)
    paths = {
        'labeled': write_image_folder(root / 'labeled', x[split['labeled']], y[split['labeled']]),
        'test': write_image_folder(root / 'test', x[split['test']], y[split['test']]),
        'unlabeled': write_parquet(root / 'unlabeled', x[split['unlabeled']][:200]),
        'labeled_parquet': write_parquet(root / 'labeled_pq', x[split['labeled']], y[split['labeled']]),
    }
    return {k: str(v) for k, v in paths.items()}


def _cfg(**kw):
    # min_steps 0: these stages are as short as their epochs say
    return TrainConfig(**{'batch_size': 32, 'num_workers': 0, 'mixed_precision': 'no', 'min_steps': 0, **kw})


@pytest.fixture(scope='module')
def teacher(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp('teacher')
    metrics = train(ModelStage(model=MODEL, epochs=6, image_size=32, lr=3e-3), digits['labeled'], out,
                    eval_data=DataSource(digits['test'], split='train'), train_cfg=_cfg(), progress=False)
    return out, metrics


def test_teacher_learns_well_above_chance(teacher):
    out, metrics = teacher
    assert metrics['top1'] > 35.0, metrics  # chance is 10%
    assert metrics['labeled_images'] == 300 and metrics['pseudo_images'] == 0
    lines = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [l['epoch'] for l in lines] == [1, 2, 3, 4, 5, 6]
    saved = json.loads((out / 'metrics.json').read_text())
    assert saved['top1'] == metrics['top1'] and set(saved) >= {'top1', 'top5', 'loss', 'epoch'}
    assert saved['head'] == 'zeros'  # a model from scratch: its classifier started at zero


def test_eval_uses_the_ema_and_the_export_is_the_ema(teacher, digits):
    out, metrics = teacher
    exported = load_file(str(out / 'model' / 'model.safetensors'))
    ckpt = sorted((out / 'checkpoints').glob('step-*'))[-1]
    ema = load_file(str(ckpt / 'ema.safetensors'))
    raw = load_file(str(ckpt / 'model.safetensors'))
    key = 'classifier.weight'
    assert torch.allclose(exported[key], ema[f'module.{key}'])
    assert not torch.allclose(exported[key], raw[key])  # the raw weights are not what we evaluate
    again = evaluate_model(str(out / 'model'), DataSource(digits['test'], split='train'), mixed_precision='no',
                           num_workers=0)
    assert again['top1'] == pytest.approx(metrics['top1'])


def test_export_loads_with_plain_timm(teacher):
    out, _ = teacher
    code = (
        'import sys, timm, json\n'
        f"m = timm.create_model('local-dir:{out / 'model'}', pretrained=True)\n"
        "assert 'timm_noisystudent' not in sys.modules\n"
        "print(json.dumps([m.num_classes, m.pretrained_cfg['label_names'], m.pretrained_cfg['input_size']]))\n")
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    num_classes, names, size = json.loads(proc.stdout)
    assert num_classes == 10 and names[0] == 'digit_0' and size == [3, 32, 32]
    config = json.loads((out / 'model' / 'config.json').read_text())
    assert config['architecture'] == MODEL
    assert sorted(p.name for p in (out / 'model').iterdir()) == ['config.json', 'model.safetensors']


def _pseudo_dir(root: Path, n: int, num_classes: int = 10, soft: bool = True) -> Path:
    """A hand-made pseudo-label directory (what `noisystudent label` writes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(num_classes) * 0.3, size=n).astype(np.float32)
    (root / 'data').mkdir(parents=True)
    table = pa.table({'index': np.arange(n, dtype=np.int64), 'probs': list(probs),
                      'label': probs.argmax(1).astype(np.int64), 'confidence': probs.max(1)})
    pq.write_table(table, root / 'data' / 'part-00000.parquet')
    (root / 'stats.json').write_text(json.dumps({'num_classes': num_classes, 'soft': soft, 'source': {}}))
    return root


def test_student_trains_on_mixed_batches(digits, teacher, tmp_path):
    pseudo = _pseudo_dir(tmp_path / 'labels', 200)
    metrics = train(ModelStage(model=str(teacher[0] / 'model'), epochs=1, image_size=32), digits['labeled'],
                    tmp_path / 'student', pseudo=pseudo, unlabeled=digits['unlabeled'],
                    train_cfg=_cfg(batch_size=8, unlabeled_ratio=3),
                    noise=NoiseConfig(randaugment='tf-m9-n2', dropout=0.3, drop_path=0.1), progress=False)
    # 200 pseudo rows are fewer than 3 per labeled row, so a step takes their share, 8 x 200/300 = 5
    # (at 24 a step each pseudo row would be seen 4.6 times an epoch, each labeled one once). The
    # epoch passes over the longer stream: the 200 pseudo rows at 5 a step (40), not the 300 labeled
    # images at 8 (38)
    assert metrics['step'] == max(200 // 5, math.ceil(300 / 8)) == 40
    assert metrics['images_seen'] == metrics['step'] * (8 + 5)
    assert metrics['pseudo_images'] == 200
    assert metrics['noise'] == {'randaugment': 'tf-m9-n2', 'dropout': 0.3, 'drop_path': 0.1, 'unlabeled_ratio': 3,
                                'pseudo_batch_size': 5}
    assert (tmp_path / 'student' / 'model' / 'model.safetensors').is_file()
    assert metrics['head'] == 'loaded'  # the teacher's classifier, same classes


def test_the_student_budget_does_not_follow_the_kept_rows(digits, teacher, tmp_path):
    steps = {}
    for kept in (5, 200):
        metrics = train(ModelStage(model=MODEL, epochs=2, image_size=32), digits['labeled'], tmp_path / f's{kept}',
                        pseudo=_pseudo_dir(tmp_path / f'labels{kept}', kept), unlabeled=digits['unlabeled'],
                        train_cfg=_cfg(batch_size=32, unlabeled_ratio=2), progress=False)
        assert metrics['pseudo_images'] == kept
        steps[kept] = metrics['step']
    # two epochs of the 300 labeled images at 32 a step, however few rows selection kept
    assert steps == {5: 2 * math.ceil(300 / 32), 200: 2 * math.ceil(300 / 32)}
    # and at least its teacher's: that one trained 6 epochs of the same labeled set
    assert steps[5] / 2 >= teacher[1]['step'] / 6


@settings(max_examples=300, deadline=None)
@given(batch=st.integers(1, 512), ratio=st.integers(1, 30), pseudo=st.integers(0, 10**7),
       labeled=st.integers(1, 10**6))
def test_a_pseudo_row_is_not_seen_more_often_than_a_labeled_row(batch, ratio, pseudo, labeled):
    n = pseudo_batch_size(batch, ratio, pseudo, labeled)
    assert 1 <= n <= batch * ratio
    if pseudo >= labeled * ratio or pseudo == 0:
        assert n == batch * ratio  # enough pseudo rows (the usual case): the ratio as set
    else:
        # per step, a pseudo row's share of its stream is at most a labeled row's, up to rounding
        # to whole images (and at least one pseudo image a step)
        assert n / pseudo <= batch / labeled + 0.5 / pseudo or n == 1
        assert n >= min(batch * ratio, round(batch * pseudo / labeled))


def test_min_steps_repeats_short_epochs(digits, tmp_path):
    with pytest.warns(UserWarning, match='32 px inputs end in a 1x1 feature map'):
        metrics = train(ModelStage(model=MODEL, epochs=1, image_size=32), digits['labeled'], tmp_path / 'out',
                        train_cfg=_cfg(batch_size=100, min_steps=7), progress=False)
    # 300 labeled images are 3 steps an epoch: 1 epoch becomes 3, for 9 steps (at least 7)
    assert metrics['epochs'] == 3 and metrics['step'] == 9
    assert metrics['lr'] == 6e-3  # no lr given: the small-data preset's for this narrow model


def test_a_students_minimum_counts_its_images_not_its_steps(digits, tmp_path):
    # a student step of 16 labeled + 11 pseudo-labeled images (200 pseudo rows beside 300 labeled:
    # 16 x 200/300) counts 27/16 batches of 16, so min_steps 480 asks for ceil(480 x 16 / 27) = 285
    # steps (480 x 16 images, what a teacher at min_steps 480 sees), not 480
    metrics = train(ModelStage(model=MODEL, epochs=1, image_size=32), digits['labeled'], tmp_path / 'student',
                    pseudo=_pseudo_dir(tmp_path / 'labels', 200), unlabeled=digits['unlabeled'],
                    train_cfg=_cfg(batch_size=16, unlabeled_ratio=3, min_steps=480), progress=False)
    # one epoch is ceil(300 / 16) = 19 steps, so 285 steps take 15 epochs
    assert metrics['noise']['pseudo_batch_size'] == 11
    assert metrics['step'] == 15 * 19 and metrics['images_seen'] == 15 * 19 * 27
    assert metrics['images_seen'] >= 480 * 16


def test_clip_grad_bounds_every_step(digits, tmp_path):
    # plain SGD moves the new head (it starts at zero) by lr x the clipped gradient: a bound of 1e-9
    # leaves it at zero to within lr x steps x 1e-9, while the unclipped run (0) moves it
    heads = {}
    for clip in (0, 1e-9):
        out = tmp_path / f'clip-{clip}'
        train(ModelStage(model=MODEL, epochs=1, image_size=32), digits['labeled'], out,
              train_cfg=_cfg(opt='momentum', momentum=0.0, weight_decay=0.0, clip_grad=clip, max_steps=4, ema_decay=0.0),
              progress=False)
        heads[clip] = load_file(str(out / 'model' / 'model.safetensors'))['classifier.weight']
    assert heads[0].abs().max() > 1e-4
    assert heads[1e-9].abs().max() < 1e-9
    assert json.loads((tmp_path / 'clip-0' / 'metrics.json').read_text())['clip_grad'] is None


def test_short_epochs_checkpoint_every_hundred_steps_and_at_the_last(digits, tmp_path):
    from timm_noisystudent import engine
    assert engine.EPOCH_CHECKPOINT_MIN_STEPS == 100
    # 300 labeled images at batch 100: 3-step epochs; 35 epochs end at steps 3, 6, ..., 105
    metrics = train(ModelStage(model=MODEL, epochs=35, image_size=32), digits['labeled'], tmp_path / 'out',
                    train_cfg=_cfg(batch_size=100, keep_checkpoints=10), progress=False)
    assert metrics['step'] == 105
    steps = sorted(int(p.name.split('-')[1]) for p in (tmp_path / 'out' / 'checkpoints').glob('step-*'))
    assert steps == [102, 105]  # the first epoch end 100 steps after the start, then the last step


def test_a_short_pass_loads_in_the_process():
    from timm_noisystudent.data import MIN_WORKER_PASS, make_loader
    rows = list(range(8 * MIN_WORKER_PASS))
    # a worker would start again every pass
    assert make_loader(rows, 9, False, 1, short_pass_in_process=True).num_workers == 0
    assert make_loader(rows, 8, False, 1, short_pass_in_process=True).num_workers == 1
    assert make_loader(rows, 9, False, 3).num_workers == 3  # asked for, or an accelerator's: kept


def test_student_noise_defaults_come_from_the_recipe():
    from timm_noisystudent.engine import resolve_stage
    b3 = resolve_stage(ModelStage(model='tf_efficientnet_b3'), TrainConfig(), NoiseConfig(), student=True)
    assert (b3.randaugment, b3.dropout, b3.drop_path, b3.unlabeled_ratio) == ('tf-m12-n2', 0.3, 0.2, 3)
    b0 = resolve_stage(ModelStage(model='tf_efficientnet_b0_ns'), TrainConfig(), NoiseConfig(), student=True)
    assert (b0.randaugment, b0.dropout, b0.unlabeled_ratio) == (None, 0.2, 1)
    teacher = resolve_stage(ModelStage(model='tf_efficientnet_b3'), TrainConfig(), NoiseConfig(), student=False)
    assert teacher.randaugment is None
    # small images: the measured default noise where the recipe has none; the recipe's own where it has one
    small = resolve_stage(ModelStage(model='tf_efficientnet_b0', image_size=32), TrainConfig(), NoiseConfig(), True)
    assert small.randaugment == 'tf-m6-n2'
    small_b3 = resolve_stage(ModelStage(model='tf_efficientnet_b3', image_size=32), TrainConfig(), NoiseConfig(), True)
    assert small_b3.randaugment == 'tf-m12-n2'
    off = resolve_stage(ModelStage(model='resnet18', image_size=32), TrainConfig(), NoiseConfig('none'), True)
    assert off.randaugment is None
    paper = resolve_stage(ModelStage(model='resnet18'), TrainConfig(preset='paper', lr=0.1), NoiseConfig(), True)
    assert paper.opt['opt'] == 'rmsproptf' and paper.lr == 0.1 and paper.opt['decay_rate'] == 0.97


def test_the_small_data_lr_follows_the_models_width():
    import timm
    from timm_noisystudent.config import small_data_lr
    from timm_noisystudent.engine import resolve_stage
    from timm_noisystudent.models import classifier_width
    width = {name: classifier_width(timm.create_model(name, num_classes=10))
             for name in ('test_efficientnet', 'tf_efficientnet_b0', 'resnet50', 'lcnet_050')}
    # lcnet pools 256 features and widens them to 1,280 before the classifier: B0's width, B0's lr
    assert timm.create_model('lcnet_050').num_features == 256 and small_data_lr(width['lcnet_050']) == 3e-3
    # the two widths measured on the dev tasks, then wider models lower
    assert small_data_lr(width['test_efficientnet']) == 6e-3 and small_data_lr(width['tf_efficientnet_b0']) == 3e-3
    assert small_data_lr(1) == 6e-3 and 1e-3 < small_data_lr(width['resnet50']) < 3e-3
    assert [small_data_lr(n) for n in (256, 512, 1280, 2048, 5504)] == sorted(
        [small_data_lr(n) for n in (256, 512, 1280, 2048, 5504)], reverse=True)
    # left to the model only when neither the stage nor the run names an lr, and only for small-data
    assert resolve_stage(ModelStage(model='tf_efficientnet_b0'), TrainConfig(), NoiseConfig(), True).lr is None
    assert resolve_stage(ModelStage(model='tf_efficientnet_b0'), TrainConfig(lr=1e-3), NoiseConfig(), True).lr == 1e-3
    assert resolve_stage(ModelStage(model='tf_efficientnet_b0', lr=2e-3), TrainConfig(lr=1e-3), NoiseConfig(),
                         False).lr == 2e-3
    assert resolve_stage(ModelStage(model='tf_efficientnet_b0'), TrainConfig(preset='paper'), NoiseConfig(),
                         True).lr == 0.016


def test_a_pretrained_stage_gets_the_finetune_recipe_and_a_scratch_stage_the_small_data_one(digits, teacher,
                                                                                              tmp_path):
    from timm_noisystudent.config import PRESETS
    # the teacher's export stands in for a pretrained checkpoint: a local model directory
    pretrained_dir = str(teacher[0] / 'model')
    cfg = TrainConfig(batch_size=32, num_workers=0, mixed_precision='no', max_steps=2)  # budgets: the presets'
    runs = {'pretrained': ModelStage(model=pretrained_dir, pretrained=True, image_size=32),
            'scratch': ModelStage(model=MODEL, image_size=32)}
    got = {name: train(stage, digits['labeled'], tmp_path / name, train_cfg=cfg, progress=False)
           for name, stage in runs.items()}
    ft, sd = got['pretrained'], got['scratch']
    assert (ft['preset'], ft['pretrained'], ft['lr'], ft['min_steps'], ft['epochs']) == \
        ('finetune', True, PRESETS['finetune']['lr'], 300, 34)  # 300 images at 32 a step: 9 full steps a pass
    assert ft['weight_decay'] == PRESETS['finetune']['weight_decay'] and ft['clip_grad'] == 1.0
    assert ft['head'] == 'loaded'  # the same 10 classes: the pretrained head is kept
    assert (sd['preset'], sd['pretrained'], sd['lr'], sd['min_steps'], sd['epochs']) == \
        ('small-data', False, 6e-3, 1000, 112)
    assert resolve_stage(runs['pretrained'], TrainConfig(preset='small-data'), NoiseConfig(), False).lr is None


def _train_cmd(digits, out, *extra):
    return CLI + ['train', '--data', digits['labeled'], '--model', MODEL, '--image-size', '32', '--epochs', '2',
                  '--batch-size', '16', '--num-workers', '0', '--mixed-precision', 'no', '--output', str(out),
                  '--checkpoint-every', '3', '--min-steps', '0', *extra]


def test_kill_and_resume_gives_the_same_weights(digits, tmp_path):
    full = subprocess.run(_train_cmd(digits, tmp_path / 'full'), capture_output=True, text=True, env=_env())
    assert full.returncode == 0, full.stderr[-2000:]

    proc = subprocess.Popen(_train_cmd(digits, tmp_path / 'killed'), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env())
    ckpts = tmp_path / 'killed' / 'checkpoints'
    deadline = time.time() + 300
    while not list(ckpts.glob('step-0000000[6-9]')) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / 'killed' / 'model').exists(), 'the run finished before it could be killed'

    resumed = subprocess.run(_train_cmd(digits, tmp_path / 'killed', '--resume'), capture_output=True, text=True,
                             env=_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'resuming from' in resumed.stdout + resumed.stderr
    a = load_file(str(tmp_path / 'full' / 'model' / 'model.safetensors'))
    b = load_file(str(tmp_path / 'killed' / 'model' / 'model.safetensors'))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not list((tmp_path / 'killed').rglob('*.tmp*'))


def test_a_resumed_stage_keeps_the_workers_its_start_measured(digits, tmp_path):
    # the measured worker count sets torch's threads, and so the floats: a resumption must not measure again
    cfg = TrainConfig(batch_size=8, num_workers=None, mixed_precision='no', min_steps=0, max_steps=4,
                      checkpoint_every=2)
    stage = ModelStage(model=MODEL, epochs=1, image_size=32)
    first = train(stage, digits['labeled'], tmp_path / 'out', train_cfg=cfg, progress=False)
    ckpts = sorted((tmp_path / 'out' / 'checkpoints').glob('step-*'))
    states = [json.loads((c / 'trainer_state.json').read_text()) for c in ckpts]
    assert len(states) == 2 and {s['num_workers'] for s in states} == {first['num_workers']}
    other = first['num_workers'] + 1  # what the start would have measured on another day
    for c, state in zip(ckpts, states):
        (c / 'trainer_state.json').write_text(json.dumps({**state, 'num_workers': other}))
    resumed = train(stage, digits['labeled'], tmp_path / 'out', train_cfg=cfg, resume=True, progress=False)
    assert resumed['num_workers'] == other and resumed['step'] == 4
    for c, state in zip(ckpts, states):  # started on another kind of machine: measured again
        (c / 'trainer_state.json').write_text(json.dumps({**state, 'num_workers': 99,
                                                          'workers_machine': 'cuda, 64 cpus, 8 processes'}))
    elsewhere = train(stage, digits['labeled'], tmp_path / 'out', train_cfg=cfg, resume=True, progress=False)
    assert elsewhere['num_workers'] < 99 and elsewhere['step'] == 4
    fresh = train(stage, digits['labeled'], tmp_path / 'fresh', train_cfg=cfg, resume=True, progress=False)
    last = sorted((tmp_path / 'fresh' / 'checkpoints').glob('step-*'))[-1]  # no checkpoint to resume: measured
    assert json.loads((last / 'trainer_state.json').read_text())['num_workers'] == fresh['num_workers']


def test_parquet_source_and_odd_images(tmp_path, digits):
    x, y = digits_arrays(32)
    root = write_image_folder(tmp_path / 'odd', x[:40], y[:40] % 2)
    a, b = root / 'digit_0', root / 'digit_1'
    Image.new('L', (20, 20), 100).save(a / 'gray.png')
    Image.new('RGBA', (20, 20), (10, 20, 30, 0)).save(a / 'rgba.png')
    Image.new('P', (20, 20), 3).save(a / 'palette.png')
    Image.new('CMYK', (20, 20), (0, 50, 100, 0)).save(b / 'cmyk.jpg')
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(b / 'sixteen.png')
    Image.new('RGB', (1, 1), (1, 2, 3)).save(b / 'tiny.png')
    (a / 'zero.png').write_bytes(b'')
    (a / 'text.jpg').write_text('not an image')
    good = (b / 'trunc.png')
    Image.fromarray(x[0]).save(good)
    good.write_bytes(good.read_bytes()[:60])
    ds = load_source(str(root))
    assert len(ds) == 49
    metrics = train(ModelStage(model=MODEL, epochs=1, image_size=32), str(root), tmp_path / 'out',
                    eval_data=DataSource(str(root)), train_cfg=_cfg(batch_size=16), progress=False)
    assert metrics['step'] == 3
    skipped = evaluate_model(str(tmp_path / 'out' / 'model'), str(root), num_workers=0, mixed_precision='no')
    assert skipped['skipped'] == 3 and skipped['images'] == 46
    for mode_file in ('gray.png', 'rgba.png', 'palette.png'):
        assert decode_image({'path': str(a / mode_file), 'bytes': None}).mode == 'RGB'
    sixteen = decode_image({'path': str(b / 'sixteen.png'), 'bytes': None})
    assert sixteen.getpixel((0, 0)) == (155, 155, 155)  # scaled from 16 bit, not clipped to white
    pq_metrics = train(ModelStage(model=MODEL, epochs=1, image_size=32), DataSource(digits['labeled_parquet']),
                       tmp_path / 'pq', train_cfg=_cfg(max_steps=2), progress=False)
    assert pq_metrics['step'] == 2 and pq_metrics['top1'] is None


def test_split_slicing_and_save_to_disk(tmp_path, digits):
    ds = load_source(DataSource(digits['labeled_parquet'], split='train[:10%]'))
    assert len(ds) == 30
    full = load_source(DataSource(digits['labeled_parquet']))
    full.save_to_disk(str(tmp_path / 'saved'))
    assert len(load_source(DataSource(str(tmp_path / 'saved'), split='train[10:20]'))) == 10
    datasets.DatasetDict({'train': full}).save_to_disk(str(tmp_path / 'saved_dict'))
    assert len(load_source(DataSource(str(tmp_path / 'saved_dict'), split='train[:50%]'))) == 150


def test_data_errors_are_user_errors(tmp_path, digits):
    with pytest.raises(UserError, match='does not exist'):
        load_source(str(tmp_path / 'missing'))
    with pytest.raises(UserError, match='image column .nope. not found; the columns are: image, label'):
        train(ModelStage(model=MODEL, epochs=1), DataSource(digits['labeled_parquet'], image_column='nope'),
              tmp_path / 'x', train_cfg=_cfg(), progress=False)
    strings = datasets.Dataset.from_dict({'image': [Image.new('RGB', (8, 8))], 'label': ['cat']})
    with pytest.raises(UserError, match='holds strings'):
        train(ModelStage(model=MODEL, epochs=1), strings, tmp_path / 'y', train_cfg=_cfg(), progress=False)
    negative = datasets.Dataset.from_dict({'image': [Image.new('RGB', (8, 8))] * 2, 'label': [0, -1]})
    with pytest.raises(UserError, match=r'labels must be in \[0, 0\], found -1..0'):
        train(ModelStage(model=MODEL, epochs=1), negative, tmp_path / 'z', train_cfg=_cfg(), progress=False)


def test_two_processes_give_the_same_eval_as_one(teacher, digits):
    out, _ = teacher
    args = ['eval', '--model', str(out / 'model'), '--data', digits['test'], '--split', 'train',
            '--json', '--mixed-precision', 'no', '--num-workers', '0', '--batch-size', '64']
    one = subprocess.run(CLI + args, capture_output=True, text=True, env=_env())
    assert one.returncode == 0, one.stderr[-2000:]
    launch = [str(Path(sys.executable).with_name('accelerate')), 'launch', '--multi_gpu', '--num_processes', '2',
              '--main_process_port', '0', '-m', 'timm_noisystudent']
    two = subprocess.run(launch + args, capture_output=True, text=True, env={**_env(), 'ACCELERATE_USE_CPU': '1'})
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = json.loads(one.stdout.strip().splitlines()[-1]), json.loads(two.stdout.strip().splitlines()[-1])
    assert m2['images'] == m1['images'] == 300  # 300 rows over 2 processes, 64-row batches: padding dropped
    assert m2['top1'] == pytest.approx(m1['top1']) and m2['top5'] == pytest.approx(m1['top5'])
    assert two.stdout.count('"top1"') == 1  # printed once, by the main process


def test_two_process_training_runs(digits, tmp_path):
    launch = [str(Path(sys.executable).with_name('accelerate')), 'launch', '--multi_gpu', '--num_processes', '2',
              '--main_process_port', '0', '-m', 'timm_noisystudent']
    cmd = launch + _train_cmd(digits, tmp_path / 'ddp', '--max-steps', '3')[3:]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), 'ACCELERATE_USE_CPU': '1'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / 'ddp' / 'metrics.json').read_text())
    assert metrics['step'] == 3 and metrics['images_seen'] == 3 * 16 * 2
