"""`noisystudent bench` end to end at toy size, and the fast paths it measures.

Nothing here is timed: speed is what the bench reports, not what a test asserts. The bf16 vs
fp32 label agreement is tested in test_labeling.py.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from timm_noisystudent.bench import make_images
from timm_noisystudent.data import EvalTransform
from timm_noisystudent.models import fold_batchnorm

CLI = [sys.executable, '-m', 'timm_noisystudent']


def _env():
    from conftest import hub_env
    return hub_env(OMP_NUM_THREADS='1', PYTHONPATH=str(Path(__file__).parent))


def test_bench_cli_writes_the_table_and_json(tmp_path):
    out = tmp_path / 'bench.json'
    proc = subprocess.run(
        CLI + ['bench', '--n', '48', '--model', 'test_efficientnet', '--image-size', '64', '--batch-size', '8',
               '--train-steps', '2', '--num-workers', '0', '--workdir', str(tmp_path / 'work'), '--json', str(out)],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'noisystudent label' in proc.stdout and 'tuned plain loop' in proc.stdout
    r = json.loads(out.read_text())
    lab, tr = r['labeling'], r['training']
    for key in ('img_per_s', 'baseline_img_per_s', 'ratio_to_baseline', 'fraction_of_ceiling', 'peak_rss_mb',
                'rss_ratio_8n_vs_n'):
        assert lab[key] is not None and lab[key] > 0, key
    for key in ('img_per_s', 'baseline_img_per_s', 'tuned_img_per_s', 'ratio_to_baseline', 'ratio_to_tuned',
                'fraction_of_ceiling', 'teacher_img_per_s', 'teacher_fraction_of_ceiling'):
        assert tr[key] is not None and tr[key] > 0, key
    assert 0.0 <= r['agreement_bf16_fp32'] <= 1.0
    assert 0.0 <= lab['agreement_with_baseline'] <= 1.0
    assert r['device'].startswith('cpu') and r['torch'] == torch.__version__
    s = r['settings']
    assert s['n'] == 48 and s['batch_size'] == 8 and s['rss_images'] == [8, 48]
    assert lab['runs']['project']['images'] == 48 and lab['runs']['project_small']['images'] == 8
    assert tr['runs']['student']['clock_steps'] == 2 + 2  # warm-up + timed steps, all through engine.train
    assert tr['runs']['teacher']['clock_steps'] == 2 + 2 and 'noisystudent teacher' in proc.stdout


def test_generated_images_vary_in_size_and_are_reused(tmp_path):
    root = make_images(tmp_path / 'img', 12, seed=1, classes=3)
    files = sorted(root.glob('class_*/*.jpg'))
    assert len(files) == 12 and len({f.parent.name for f in files}) == 3
    sizes = [Image.open(f).size for f in files]
    assert all(256 <= s <= 500 for size in sizes for s in size) and len(set(sizes)) > 6
    mtime = files[0].stat().st_mtime_ns
    make_images(root, 12, seed=1, classes=3)
    assert files[0].stat().st_mtime_ns == mtime  # the same set is not written again


def _photo(w, h, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


@pytest.mark.parametrize('config', [
    dict(input_size=(3, 224, 224), interpolation='bicubic', crop_pct=0.875),
    dict(input_size=(3, 240, 240), interpolation='bilinear', crop_pct=0.9),
    dict(input_size=(3, 32, 32), interpolation='bicubic', crop_pct=1.0),
])
def test_eval_transform_gives_timm_input_bit_for_bit(config):
    config = timm.data.resolve_data_config(config)
    timm_tf = timm.data.create_transform(**config)
    fast = EvalTransform.of(config)
    assert isinstance(fast, EvalTransform)
    images = [_photo(w, h, i) for i, (w, h) in enumerate([(300, 400), (500, 257), (256, 256), (224, 224),
                                                         (31, 40), (1000, 333), (257, 256)])]
    expected = torch.stack([timm_tf(img) for img in images])
    got = fast.normalize(torch.stack([fast(img) for img in images]))
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, expected)


def test_eval_transform_falls_back_to_timm_for_other_crops():
    config = timm.data.resolve_data_config(dict(input_size=(3, 224, 224), crop_mode='squash'))
    assert not isinstance(EvalTransform.of(config), EvalTransform)


def _eval_with_stats(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_fold_batchnorm_keeps_the_outputs():
    torch.manual_seed(0)
    model = _eval_with_stats(timm.create_model('test_efficientnet'))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    folded = fold_batchnorm(model, torch.randn(2, 3, 64, 64))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), before, rtol=1e-4, atol=1e-5)


class _BackwardOrder(torch.nn.Module):
    """conv then bn among the children, but forward runs the bn first: folding would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(self.bn(x)).mean((2, 3))


def test_fold_batchnorm_leaves_a_model_it_cannot_fold_as_it_was():
    torch.manual_seed(0)
    model = _eval_with_stats(_BackwardOrder())
    model.bn.weight.data.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    same = fold_batchnorm(model, x)
    assert isinstance(same.bn, torch.nn.BatchNorm2d) and same.conv.bias is None
    with torch.no_grad():
        assert torch.equal(same(x), before)


def test_workers_and_threads_share_the_cores(monkeypatch):
    from timm_noisystudent.runtime import num_workers_for
    from timm_noisystudent.runtime import cpu_threads, torch_threads

    monkeypatch.setattr('os.cpu_count', lambda: 2)
    cpu, gpu = torch.device('cpu'), torch.device('cuda')  # only their types are read
    assert num_workers_for(None, 224, cpu) == 0  # B0 at 224 px: the model needs both cores
    assert num_workers_for(None, 32, cpu) == 1  # small images: data costs about what the model does
    assert num_workers_for(None, 224, gpu) == 1
    assert num_workers_for(3, 224, cpu) == 3  # asked for: kept
    monkeypatch.setattr('os.cpu_count', lambda: 64)
    assert num_workers_for(None, 224, gpu) == 8 and num_workers_for(None, 224, cpu) == 8

    monkeypatch.setattr('os.sched_getaffinity', lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    cpu = torch.device('cpu')
    assert cpu_threads(0, cpu) is None  # no workers: torch keeps its own count
    assert cpu_threads(1, cpu) == 1
    assert cpu_threads(1, torch.device('cuda')) is None
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    assert cpu_threads(1, cpu) == 1  # never below one thread

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_tied_labels_are_the_first_maximum_as_argmax_defines():
    from timm_noisystudent.labeling import _soft_columns

    probs = torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.4, 0.05, 0.15, 0.4], [0.1, 0.2, 0.3, 0.4]])
    cols, labels, conf = _soft_columns(probs, None)
    assert labels.tolist() == [1, 0, 3] and conf.tolist() == pytest.approx([0.3, 0.4, 0.4])
    cols, labels, conf = _soft_columns(probs, 3)
    assert labels.tolist() == [1, 0, 3]
    assert cols['topk_idx'].tolist() == [[1, 2, 3], [0, 3, 2], [3, 2, 1]]
    assert cols['topk_prob'][:, 0].tolist() == pytest.approx([0.3, 0.4, 0.4])


_FAULTS = '''
import json, resource, sys, torch
from timm_noisystudent import runtime

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        x = torch.empty(2 ** 24)  # 64 MiB: above glibc's largest mmap threshold
        x.fill_(1.0)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
runtime.make_accelerator()  # on CPU this keeps freed memory
faults()  # the heap grows to its peak once
print(json.dumps({'default': default, 'kept': runtime.keep_freed_memory(), 'after': faults()}))
'''


@pytest.mark.skipif(not sys.platform.startswith('linux') or __import__('platform').libc_ver()[0] != 'glibc',
                    reason='glibc only')
def test_cpu_runs_keep_freed_memory_instead_of_faulting_it_in_at_every_step():
    env = _env()
    env['ACCELERATE_USE_CPU'] = '1'
    for key in [k for k in env if k.startswith('MALLOC_') or k in ('LD_PRELOAD', 'GLIBC_TUNABLES')]:
        del env[key]
    proc = subprocess.run([sys.executable, '-c', _FAULTS], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r['kept'] is True
    assert r['default'] > 20 * 10000  # every 64 MiB tensor was a fresh mmap: ~16k page faults each
    assert r['after'] < r['default'] / 10  # the memory is reused

    env['MALLOC_ARENA_MAX'] = '2'  # the user chose allocator settings: leave glibc alone
    proc = subprocess.run([sys.executable, '-c', _FAULTS], env=env, capture_output=True, text=True, timeout=300)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r['kept'] is False and r['after'] > r['default'] / 2


def test_bench_scale_at_toy_size_reports_each_figure(tmp_path):
    out = tmp_path / 'scale.json'
    proc = subprocess.run(CLI + ['bench', '--scale', '300', '--workdir', str(tmp_path / 'work'), '--json', str(out)],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'first student step (s)' in proc.stdout
    row = json.loads(out.read_text())['sizes'][0]
    assert row['n'] == 300
    for key in ('index_s', 'open_s', 'label_setup_s', 'selection_s', 'selection_rss_mb', 'first_step_s'):
        assert row[key] > 0, key
    files = sorted((tmp_path / 'work' / 'n300' / 'folder' / 'images').rglob('*.jpg'))
    assert len(files) == 300 and files[0].stat().st_nlink > 1  # hard links, not copies
    index = tmp_path / 'work' / 'n300' / 'index'
    from timm_noisystudent.data import open_index
    assert len(open_index(index)) == 300
