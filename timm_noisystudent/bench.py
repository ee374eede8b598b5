"""``noisystudent bench``: labeling and student training, side by side with plain timm loops.

Absolute speeds vary from machine to machine; ratios measured in one run on one machine do
not. So every number here comes with its baseline from the same run:

* labeling, end to end from JPEG files to written parquet: ``labeling.label`` against a loop
  written the way the timm docs show (``create_transform(**resolve_data_config(model))``, a
  ``DataLoader`` with as many workers, fp32 NCHW, ``torch.no_grad``, softmax kept in a Python
  list), and the ceiling: the bare forward in the project's precision and layout on ready tensors;
* training, as student steps through ``engine.train`` (mixed labeled + pseudo-labeled batch,
  RandAugment, dropout, stochastic depth, EMA) and as teacher steps (crop/flip, EMA), against a
  plain loop (timm's train transform, fp32 NCHW, SGD, cross-entropy), a tuned plain loop
  (channels_last, and bf16 autocast where bf16 is fast, as timm's ``train.py --channels-last
  --amp --amp-dtype bfloat16``), and the bare forward+backward ceiling;
* peak RSS of labeling at N/8 and N images, each in its own process so the peaks do not mix;
* top-1 agreement of bf16 and fp32 labels.

The project's measurements (labeling, student, ceilings) each run in a fresh process with the
process settings the project makes (threads, glibc's allocator); the plain loops run in this
one with the defaults, as a user's own script would.

The images are generated JPEGs of varied sizes (crops of scikit-learn's sample photos under a
smooth colour field), written as an image folder so that decoding is part of the work.
Imports only go downward: data, models, engine, labeling, augment, config.
"""
import math
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from .config import UserError
from .files import text_table

__all__ = ['run_bench', 'format_table', 'make_images', 'DEFAULTS']

DEFAULTS = dict(
    n=2048, model='tf_efficientnet_b0', image_size=None, batch_size=32, device='cpu', num_workers=None,
    seed=0, classes=10, randaugment='tf-m15-n2', unlabeled_ratio=1,
)
_MIN_SIDE, _MAX_SIDE = 256, 500


# --- data ----------------------------------------------------------------------------------------

def _photos() -> List[Any]:
    from PIL import Image
    try:
        from sklearn.datasets import load_sample_images
        return [Image.fromarray(a) for a in load_sample_images().images]
    except ImportError:  # smooth random fields alone, when scikit-learn is missing
        return []


def make_images(root: os.PathLike, n: int, seed: int = 0, classes: int = 10,
                sides: Sequence[int] = (_MIN_SIDE, _MAX_SIDE)) -> Path:
    """An image folder of ``n`` JPEGs, ``classes`` subfolders, sides uniform in ``sides`` (256..500 px).

    Kept when ``root`` already holds the same set (a DONE marker names it). Written by a few
    processes; each image depends only on (seed, its number).
    """
    from concurrent.futures import ProcessPoolExecutor

    root = Path(root)
    marker = root / 'DONE'
    spec = f'{n} {seed} {classes} {sides[0]} {sides[1]}'
    if marker.is_file() and marker.read_text() == spec:
        return root
    shutil.rmtree(root, ignore_errors=True)
    for c in range(classes):
        (root / f'class_{c:03d}').mkdir(parents=True, exist_ok=True)
    jobs = min(4, os.cpu_count() or 1)
    chunks = [(str(root), range(k, n, jobs), seed, classes, tuple(sides)) for k in range(jobs)]
    if jobs > 1 and n >= 64:
        with ProcessPoolExecutor(jobs) as pool:
            list(pool.map(_write_images, *zip(*chunks)))
    else:
        for chunk in chunks:
            _write_images(*chunk)
    marker.write_text(spec)
    return root


def _write_images(root: str, numbers, seed: int, classes: int, sides=(_MIN_SIDE, _MAX_SIDE)) -> None:
    from PIL import Image

    photos = _photos()
    for i in numbers:
        rng = np.random.default_rng([seed, i])
        w, h = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(
            (w, h), Image.Resampling.BICUBIC)
        img = field
        if photos:
            src = photos[i % len(photos)]
            cw = int(rng.integers(96, src.width // 2))
            ch = min(int(cw * h / w), src.height - 1)
            x0, y0 = int(rng.integers(0, src.width - cw)), int(rng.integers(0, src.height - ch))
            crop = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BILINEAR)
            img = Image.blend(crop, field, float(rng.uniform(0.1, 0.5)))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img.save(Path(root) / f'class_{i % classes:03d}' / f'{i:06d}.jpg', quality=90)


def _sorted_files(root: Path) -> List[Path]:
    return sorted(root.glob('class_*/*.jpg'))


# --- timing helpers ------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _steps_per_s(times: List[float], warmup: int, per_step: int) -> Optional[float]:
    """Images per second over the steps after the first ``warmup`` (at least one), from step end times."""
    if warmup < 1 or len(times) <= warmup or times[-1] <= times[warmup - 1]:
        return None
    return (len(times) - warmup) * per_step / (times[-1] - times[warmup - 1])


@contextmanager
def _threads_kept():
    """Measurements may change torch's thread count; the next one starts from the same."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _model(name: str, seed: int, **kwargs) -> torch.nn.Module:
    import timm
    from .models import load_model
    torch.manual_seed(seed)
    if timm.is_model(name):
        return timm.create_model(name, pretrained=False, **kwargs)  # random weights: no download
    return load_model(name, **kwargs)


def _data_config(model: torch.nn.Module, image_size: Optional[int]) -> Dict[str, Any]:
    from .models import data_config_of
    return data_config_of(model, image_size)


def _fast_bf16(device: torch.device) -> bool:
    from .runtime import cpu_has_fast_bf16
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


# --- labeling ------------------------------------------------------------------------------------

def baseline_labeling(model_name: str, folder: Path, n: int, batch_size: int, num_workers: int,
                      device: torch.device, out: Path, seed: int = 0, image_size: Optional[int] = None
                      ) -> Dict[str, Any]:
    """The timm-docs loop: eval transform, DataLoader, fp32 NCHW, no_grad, softmax in a list, parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import timm

    model = _model(model_name, seed).eval().to(device)
    config = timm.data.resolve_data_config({'input_size': (3, image_size, image_size)} if image_size else {},
                                           model=model)
    transform = timm.data.create_transform(**config)
    dataset = timm.data.ImageDataset(str(folder), transform=transform)
    dataset = torch.utils.data.Subset(dataset, range(min(n, len(dataset))))
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    probs: List[List[float]] = []
    with torch.no_grad():
        for x, _ in loader:
            logits = model(x.to(device))
            probs.extend(logits.softmax(dim=-1).cpu().tolist())
    table = pa.table({'index': list(range(len(probs))), 'probs': probs,
                      'label': [int(np.argmax(p)) for p in probs], 'confidence': [max(p) for p in probs]})
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    seconds = time.perf_counter() - t0
    files = [dataset.dataset.filename(i, absolute=True) for i in dataset.indices]
    labels = dict(zip((os.path.realpath(f) for f in files), table.column('label').to_pylist()))
    return {'images': len(probs), 'seconds': round(seconds, 3), 'img_per_s': len(probs) / seconds,
            'labels': labels}


def _same_labels(project_out: Path, folder: Path, n: int, baseline: Dict[str, int]) -> Optional[float]:
    """Share of the baseline's images that the project labeled with the same top-1 (matched by file)."""
    import pyarrow.parquet as pq
    from .config import DataSource
    from .data import load_source, undecoded

    ds = load_source(DataSource(path=str(folder), split=f'train[:{n}]'))
    paths = [os.path.realpath(v['path']) for v in undecoded(ds, 'image')['image']]
    same = total = 0
    for f in sorted((project_out / 'raw').glob('*.parquet')):
        t = pq.read_table(f, columns=['index', 'label'])
        for i, lab in zip(t.column('index').to_pylist(), t.column('label').to_pylist()):
            if paths[i] in baseline:
                same += int(baseline[paths[i]] == lab)
                total += 1
    return same / total if total else None


def inference_ceiling(model_name: str, batch_size: int, device: torch.device, precision: str,
                      batches: int, seed: int = 0, image_size: Optional[int] = None) -> Dict[str, Any]:
    """The bare forward of the model as labeling runs it (BatchNorm folded, channels_last, its precision)."""
    from .models import fold_batchnorm

    model = _model(model_name, seed).eval().to(device)
    size = _data_config(model, image_size)['input_size']
    x = torch.randn(batch_size, *size, device=device).contiguous(memory_format=torch.channels_last)
    model = fold_batchnorm(model, x[:2]).to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float16
    times = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=precision in ('bf16', 'fp16')):
        for _ in range(batches + 1):
            model(x)
            _sync(device)
            times.append(time.perf_counter())
    return {'img_per_s': _steps_per_s(times, 1, batch_size), 'batches': batches, 'precision': precision,
            'layout': 'channels_last'}


def bf16_agreement(model_name: str, folder: Path, n: int, batch_size: int, device: torch.device,
                   seed: int = 0, image_size: Optional[int] = None) -> Dict[str, Any]:
    """Share of images whose top-1 is the same under bf16 autocast as in fp32 (the labeling path)."""
    import timm
    from .data import decode_image

    model = _model(model_name, seed).eval().to(device, memory_format=torch.channels_last)
    transform = timm.data.create_transform(**_data_config(model, image_size))
    files = _sorted_files(folder)[:n]
    same = total = 0
    confidence = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(files), batch_size):
            x = torch.stack([transform(decode_image(str(f))) for f in files[b:b + batch_size]])
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            logits = model(x).float()
            full = logits.argmax(-1)
            confidence += logits.softmax(-1).max(-1).values.tolist()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                half = model(x).float().argmax(-1)
            same += int((full == half).sum())
            total += len(full)
    # random weights give near-uniform outputs (top-1 ~ 1/classes): ties that bf16 rounding breaks
    return {'agreement': same / total if total else None, 'images': total,
            'median_top1_prob': float(np.median(confidence)) if confidence else None,
            'seconds': round(time.perf_counter() - t0, 2)}


def _child_env(device: torch.device) -> Dict[str, str]:
    env = dict(os.environ)
    if device.type == 'cpu':
        env['ACCELERATE_USE_CPU'] = '1'
    return env


def project_labeling(model_name: str, folder: Path, n: int, batch_size: int, num_workers: Optional[int],
                     device: torch.device, out: Path, seed: int = 0, image_size: Optional[int] = None,
                     precision: str = 'auto') -> Dict[str, Any]:
    """``labeling.label`` over the first ``n`` images, in a fresh process that reports its peak RSS."""
    shutil.rmtree(out, ignore_errors=True)  # label() would resume from shards left by an earlier run
    args = dict(model=model_name, folder=str(folder), n=n, batch_size=batch_size, num_workers=num_workers,
                out=str(out), seed=seed, image_size=image_size, precision=precision)
    return _in_child('label', args, device)


def _in_child(kind: str, args: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """One of the project's measurements in a fresh process, with the process-wide settings it makes.

    The project's runs change their process (torch threads, glibc's allocator, Accelerate state);
    the plain loops run in this process, as a user's own script would, and must not inherit them.
    """
    proc = subprocess.run([sys.executable, '-m', 'timm_noisystudent.bench', '--child', kind, json.dumps(args)],
                          env=_child_env(device), capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f'the {kind} process failed:\n' + '\n'.join(tail))
    return json.loads(lines[-1])


class _PeakRSS:
    """Peak resident memory of this process and its children (DataLoader workers), sampled."""

    def __init__(self, every: float = 0.1):
        self.every, self.peak = every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self._sample())

    def __enter__(self):
        try:
            import psutil  # noqa: F401
            self._thread.start()
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        # ru_maxrss is exact for this process (KiB on Linux); the sampler adds the workers
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        self.main_peak = own
        self.peak = max(self.peak, own + (kids if not self._thread.ident else 0))


def _child_label(args: Dict[str, Any]) -> Dict[str, Any]:
    from .config import DataSource, LabelsConfig
    from .labeling import label

    with _PeakRSS() as rss:
        model = _model(args['model'], args['seed'])
        source = DataSource(path=args['folder'], split=f"train[:{args['n']}]")
        cfg = LabelsConfig(batch_size=args['batch_size'], threshold=0.0, per_class='none',
                           mixed_precision=args['precision'])
        t0 = time.perf_counter()
        stats = label(model, source, args['out'], cfg, num_workers=args['num_workers'], progress=False,
                      image_size=args['image_size'])
        wall = time.perf_counter() - t0
    return {'images': stats['rows_labeled'], 'img_per_s': stats['img_per_s'],
            'labeling_seconds': stats['labeling_seconds'], 'label_call_seconds': round(wall, 3),
            'precision': stats['mixed_precision'], 'peak_rss_mb': round(rss.peak / 2 ** 20, 1),
            'main_peak_rss_mb': round(rss.main_peak / 2 ** 20, 1), 'threads': torch.get_num_threads()}


# --- training ------------------------------------------------------------------------------------

def _step_clock():
    from accelerate.tracking import GeneralTracker

    class StepClock(GeneralTracker):
        """An Accelerate tracker that keeps the time of each logged step: engine.train logs every step."""
        name = 'noisystudent-bench-clock'
        requires_logging_directory = False
        main_process_only = True

        def __init__(self):
            super().__init__()
            self.times: List[float] = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            self.times.append(time.perf_counter())

        def finish(self):
            pass

    return StepClock()


def _pseudo_dir(out: Path, indices: np.ndarray, classes: int, seed: int) -> Path:
    """A hand-made label directory: soft labels over ``classes`` for rows ``indices``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(indices), classes)).astype(np.float32) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    (out / 'data').mkdir(parents=True, exist_ok=True)
    table = pa.table({'index': pa.array(indices.astype(np.int64)),
                      'probs': pa.array(list(probs.astype(np.float32)), type=pa.list_(pa.float32())),
                      'label': pa.array(probs.argmax(1).astype(np.int64)),
                      'confidence': pa.array(probs.max(1).astype(np.float32))})
    pq.write_table(table, out / 'data' / 'rows.parquet')
    (out / 'stats.json').write_text(json.dumps({'num_classes': classes, 'soft': True, 'rows_after': len(indices)}))
    return out


def _timed_train(stage, labeled, out: Path, steps: int, warmup: int, images_per_step: int, num_workers, precision,
                 seed: int, **train_kwargs) -> Dict[str, Any]:
    """``engine.train`` for warm-up + ``steps`` steps, each step's time kept by an Accelerate tracker."""
    from .config import TrainConfig
    from .engine import train

    clock = _step_clock()
    cfg = TrainConfig(max_steps=warmup + steps, num_workers=num_workers, log_with=[clock], mixed_precision=precision)
    with _threads_kept():
        metrics = train(stage, labeled, out, train_cfg=cfg, seed=seed, progress=False, **train_kwargs)
    rate = _steps_per_s(clock.times, warmup, images_per_step)
    return {'img_per_s': rate if rate is not None else metrics['img_per_s'], 'steps': steps,
            'images_per_step': images_per_step, 'clock_steps': len(clock.times),
            'num_workers': metrics['num_workers']}


def student_training(model_name: str, folder: Path, n: int, batch_size: int, num_workers: Optional[int],
                     out: Path, steps: int, warmup: int, seed: int = 0, image_size: Optional[int] = None,
                     randaugment: str = DEFAULTS['randaugment'], unlabeled_ratio: int = 1,
                     classes: int = 10, precision: str = 'auto') -> Dict[str, Any]:
    """Student steps through ``engine.train``: its loader, mixed batch, noise, optimizer and EMA."""
    from .config import DataSource, ModelStage, NoiseConfig

    per_step = batch_size
    labeled_b = max(1, per_step // (1 + unlabeled_ratio))
    n_labeled = max(labeled_b * 2, n // 4)
    pseudo_rows = np.arange(n_labeled, n)
    total = warmup + steps
    if len(pseudo_rows) < (total + 1) * labeled_b * unlabeled_ratio:
        raise UserError(f'--n {n} is too small for {total} student steps of {per_step} images; raise --n.')
    shutil.rmtree(out, ignore_errors=True)
    pseudo = _pseudo_dir(out / 'pseudo', pseudo_rows, classes, seed)
    stage = ModelStage(model=model_name, epochs=1, image_size=image_size, batch_size=labeled_b,
                       unlabeled_ratio=unlabeled_ratio, randaugment=randaugment, dropout=0.2, drop_path=0.2)
    # the student's head is random: the bench does not download weights
    result = _timed_train(stage, DataSource(path=str(folder), split=f'train[:{n_labeled}]'), out / 'student',
                          steps, warmup, labeled_b * (1 + unlabeled_ratio), num_workers, precision, seed,
                          pseudo=pseudo, unlabeled=DataSource(path=str(folder)), noise=NoiseConfig())
    return {**result, 'randaugment': randaugment, 'labeled_per_step': labeled_b}


def teacher_training(model_name: str, folder: Path, batch_size: int, num_workers: Optional[int], out: Path,
                     steps: int, warmup: int, seed: int = 0, image_size: Optional[int] = None,
                     precision: str = 'auto') -> Dict[str, Any]:
    """Teacher steps through ``engine.train`` on the whole folder: crop/flip, its loader, optimizer and EMA."""
    from .config import DataSource, ModelStage

    shutil.rmtree(out, ignore_errors=True)
    stage = ModelStage(model=model_name, epochs=1, image_size=image_size, batch_size=batch_size)
    return _timed_train(stage, DataSource(path=str(folder)), out / 'teacher', steps, warmup, batch_size,
                        num_workers, precision, seed)


def plain_training(model_name: str, folder: Path, batch_size: int, num_workers: int, device: torch.device,
                   steps: int, warmup: int, seed: int = 0, image_size: Optional[int] = None,
                   channels_last: bool = False, amp_dtype: Optional[torch.dtype] = None,
                   classes: int = 10) -> Dict[str, Any]:
    """A plain timm loop: timm's train transform, SGD, cross-entropy; optionally channels_last + autocast."""
    import timm

    model = _model(model_name, seed, num_classes=classes, drop_rate=0.2, drop_path_rate=0.2).train().to(device)
    config = _data_config(model, image_size)
    transform = timm.data.create_transform(**config, is_training=True)
    dataset = timm.data.ImageDataset(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                         drop_last=True, generator=torch.Generator().manual_seed(seed))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for step, (x, y) in enumerate(loader):
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
        times.append(time.perf_counter())
        if step + 1 >= warmup + steps:
            break
    return {'img_per_s': _steps_per_s(times, warmup, batch_size), 'steps': steps,
            'layout': 'channels_last' if channels_last else 'NCHW',
            'precision': {None: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[amp_dtype]}


def training_ceiling(model_name: str, batch_size: int, device: torch.device, precision: str, steps: int,
                     seed: int = 0, image_size: Optional[int] = None, classes: int = 10) -> Dict[str, Any]:
    """The bare forward+backward (no data, no optimizer) in the project's training precision and layout,
    with the convolutions training uses (``engine.train`` crops small-map depthwise kernels where that pays)."""
    from .models import crop_small_map_depthwise, small_map_depthwise_pays

    model = _model(model_name, seed, num_classes=classes, drop_rate=0.2, drop_path_rate=0.2)
    model = model.train().to(device, memory_format=torch.channels_last)
    cropped = crop_small_map_depthwise(model) if small_map_depthwise_pays(device) else 0
    size = _data_config(model, image_size)['input_size']
    x = torch.randn(batch_size, *size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch_size,), device=device)
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float16
    times = []
    for _ in range(steps + 1):
        with torch.autocast(device.type, dtype=dtype, enabled=precision in ('bf16', 'fp16')):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter())
    return {'img_per_s': _steps_per_s(times, 1, batch_size), 'steps': steps, 'precision': precision,
            'layout': 'channels_last', 'cropped_depthwise': cropped}


# --- the whole bench -----------------------------------------------------------------------------

def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a and b else None


def _device(name: str) -> torch.device:
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda needs a CUDA GPU and a CUDA build of torch; use --device cpu.')
    if name not in ('cpu', 'cuda'):
        raise UserError(f'--device must be cpu or cuda, not {name!r}.')
    if name == 'cpu':
        # Accelerate (engine.train, labeling.label) would otherwise take a GPU when there is one
        os.environ['ACCELERATE_USE_CPU'] = '1'
    return torch.device(name)


def run_bench(
        n: int = DEFAULTS['n'],
        model: str = DEFAULTS['model'],
        batch_size: int = DEFAULTS['batch_size'],
        device: str = DEFAULTS['device'],
        image_size: Optional[int] = DEFAULTS['image_size'],
        num_workers: Optional[int] = DEFAULTS['num_workers'],
        workdir: Optional[os.PathLike] = None,
        seed: int = DEFAULTS['seed'],
        baseline_images: Optional[int] = None,
        agreement_images: Optional[int] = None,
        train_steps: int = 4,
        log=print,
) -> Dict[str, Any]:
    """Run every measurement once and return the results (the ``--json`` document)."""
    from .runtime import num_workers_for
    from .runtime import resolve_precision

    if n < 16:
        raise UserError('--n must be at least 16.')
    if batch_size < 2:
        raise UserError('--batch-size must be at least 2.')
    dev = _device(device)
    input_px = _data_config(_model(model, seed), image_size)['input_size'][-1]
    # what labeling.label and engine.train pick for themselves; the plain loops get as many
    workers = num_workers_for(num_workers, input_px, dev)
    fast_bf16 = _fast_bf16(dev)
    baseline_images = min(n, baseline_images or 8 * batch_size)
    # bf16 without hardware support runs ~20x slower than fp32 on CPU: keep that sample small
    agreement_images = min(n, agreement_images or (256 if fast_bf16 else 8))
    # what 'auto' picks on this device (resolve_precision would look at a GPU even under --device cpu)
    infer_precision = (resolve_precision('auto', 'inference') if dev.type == 'cuda'
                       else 'bf16' if fast_bf16 else 'no')
    train_precision = resolve_precision('auto', 'train') if dev.type == 'cuda' else 'no'
    tuned_amp = torch.bfloat16 if fast_bf16 else None
    # small inputs come from small images (CIFAR-like data), not from photos shrunk at every load
    sides = (_MIN_SIDE, _MAX_SIDE) if input_px > 64 else (input_px, input_px + input_px // 2)
    own_workdir = workdir is None
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix='noisystudent-bench-'))
    root.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {
        'device': _device_name(dev), 'torch': torch.__version__,
        'settings': {'n': n, 'model': model, 'image_size': image_size, 'batch_size': batch_size,
                     'num_workers': workers, 'torch_threads': torch.get_num_threads(), 'seed': seed,
                     'cpu_count': os.cpu_count(), 'fast_bf16': fast_bf16,
                     'labeling_precision': infer_precision, 'training_precision': train_precision,
                     'baseline_labeling_images': baseline_images, 'agreement_images': agreement_images,
                     'rss_images': [max(batch_size, n // 8), n], 'train_steps': train_steps,
                     'image_sides': list(sides),
                     'train_warmup_steps': 2, 'student_randaugment': DEFAULTS['randaugment'],
                     'student_unlabeled_ratio': DEFAULTS['unlabeled_ratio']},
        'load_avg_start': _load(),
    }
    t_all = time.perf_counter()
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one 'Generating train split' bar per load is noise here
    try:
        log(f'generating {n} JPEGs in {root / "images"} ...')
        folder = make_images(root / 'images', n, seed, DEFAULTS['classes'], sides=sides)
        lab: Dict[str, Any] = {}
        small_n = max(batch_size, n // 8)
        log(f'labeling {small_n} images (noisystudent label, own process) ...')
        small = project_labeling(model, folder, small_n, batch_size, num_workers, dev, root / 'label-small',
                                 seed, image_size, infer_precision)
        log(f'labeling {n} images (noisystudent label, own process) ...')
        full = project_labeling(model, folder, n, batch_size, num_workers, dev, root / 'label-full', seed,
                                image_size, infer_precision)
        log(f'labeling {baseline_images} images (timm docs loop) ...')
        with _threads_kept():
            base = baseline_labeling(model, folder, baseline_images, batch_size, workers, dev,
                                     root / 'baseline.parquet', seed, image_size)
        log('labeling ceiling (bare forward) ...')
        ceiling = _in_child('ceiling', dict(workload='inference', model_name=model, batch_size=batch_size,
                                            device=str(dev), precision=infer_precision, batches=4, seed=seed,
                                            image_size=image_size), dev)
        lab.update({
            'img_per_s': full['img_per_s'], 'baseline_img_per_s': base['img_per_s'],
            'ceiling_img_per_s': ceiling['img_per_s'],
            'ratio_to_baseline': _ratio(full['img_per_s'], base['img_per_s']),
            'fraction_of_ceiling': _ratio(full['img_per_s'], ceiling['img_per_s']),
            'peak_rss_mb': full['peak_rss_mb'], 'peak_rss_mb_small': small['peak_rss_mb'],
            'rss_ratio_8n_vs_n': _ratio(full['peak_rss_mb'], small['peak_rss_mb']),
            # the fast path must not change labels: top-1 against the timm-docs loop, image by image
            'agreement_with_baseline': _same_labels(root / 'label-full', folder, n, base.pop('labels')),
            'runs': {'project': full, 'project_small': small, 'baseline': base, 'ceiling': ceiling},
        })
        results['labeling'] = lab

        log(f'student training ({train_steps} timed steps, engine.train) ...')
        student = _in_child('student', dict(
            model_name=model, folder=str(folder), n=n, batch_size=batch_size, num_workers=num_workers,
            out=str(root / 'train'), steps=train_steps, warmup=2, seed=seed, image_size=image_size,
            randaugment=DEFAULTS['randaugment'], unlabeled_ratio=DEFAULTS['unlabeled_ratio'],
            classes=DEFAULTS['classes'], precision=train_precision), dev)
        log(f'teacher training ({train_steps} timed steps, engine.train) ...')
        teacher = _in_child('teacher', dict(
            model_name=model, folder=str(folder), batch_size=batch_size, num_workers=num_workers,
            out=str(root / 'train-teacher'), steps=train_steps, warmup=2, seed=seed, image_size=image_size,
            precision=train_precision), dev)
        log('plain timm training loop ...')
        with _threads_kept():
            base_t = plain_training(model, folder, batch_size, workers, dev, max(2, train_steps - 1), 1, seed,
                                    image_size)
        log('tuned plain training loop ...')
        with _threads_kept():
            tuned = plain_training(model, folder, batch_size, workers, dev, max(2, train_steps - 1), 1, seed,
                                   image_size, channels_last=True, amp_dtype=tuned_amp)
        log('training ceiling (bare forward+backward) ...')
        ceil_t = _in_child('ceiling', dict(workload='train', model_name=model, batch_size=batch_size,
                                           device=str(dev), precision=train_precision,
                                           steps=max(2, train_steps - 1), seed=seed, image_size=image_size), dev)
        results['training'] = {
            'img_per_s': student['img_per_s'], 'baseline_img_per_s': base_t['img_per_s'],
            'tuned_img_per_s': tuned['img_per_s'], 'ceiling_img_per_s': ceil_t['img_per_s'],
            'ratio_to_baseline': _ratio(student['img_per_s'], base_t['img_per_s']),
            'ratio_to_tuned': _ratio(student['img_per_s'], tuned['img_per_s']),
            'fraction_of_ceiling': _ratio(student['img_per_s'], ceil_t['img_per_s']),
            'teacher_img_per_s': teacher['img_per_s'],
            'teacher_fraction_of_ceiling': _ratio(teacher['img_per_s'], ceil_t['img_per_s']),
            'runs': {'student': student, 'teacher': teacher, 'baseline': base_t, 'tuned': tuned, 'ceiling': ceil_t},
        }

        log(f'bf16 vs fp32 top-1 on {agreement_images} images ...')
        agree = bf16_agreement(model, folder, agreement_images, min(batch_size, agreement_images), dev, seed,
                               image_size)
        results['agreement_bf16_fp32'] = agree['agreement']
        results['agreement'] = agree
    finally:
        if bars:
            datasets.enable_progress_bars()
        if own_workdir:
            shutil.rmtree(root, ignore_errors=True)
    results['seconds'] = round(time.perf_counter() - t_all, 1)
    results['load_avg_end'] = _load()
    return results


def _load() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _device_name(dev: torch.device) -> str:
    if dev.type == 'cuda':
        return f'cuda: {torch.cuda.get_device_name(dev)}'
    return f'cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores'


def _figure(v: Optional[float], spec: str = '.1f', suffix: str = '') -> str:
    return '-' if v is None else f'{v:{spec}}{suffix}'


def _row(name: str, rate: Optional[float], baseline: Optional[float], ceiling: Optional[float]) -> tuple:
    return (name, _figure(rate), _figure(_ratio(rate, baseline), '.2f', 'x'), _figure(_pct(rate, ceiling), '.0f', '%'))


def format_table(r: Dict[str, Any]) -> str:
    """The results as the table the README shows."""
    s, lab, tr = r['settings'], r['labeling'], r['training']
    lr, tr_runs = lab['runs'], tr['runs']
    lab_base, lab_ceil = lab['baseline_img_per_s'], lab['ceiling_img_per_s']
    tr_base, tr_ceil = tr['baseline_img_per_s'], tr['ceiling_img_per_s']
    header = ('img/s', 'vs baseline', 'of ceiling')
    rows = [
        ('labeling: JPEG files -> parquet',) + header,
        _row(f"noisystudent label ({lr['project']['images']} images, {_prec(lr['project']['precision'])})",
             lab['img_per_s'], lab_base, lab_ceil),
        _row(f"baseline: timm docs loop ({lr['baseline']['images']} images, fp32 NCHW)", lab_base, lab_base, lab_ceil),
        _row(f"ceiling: bare forward ({_prec(lr['ceiling']['precision'])}, channels_last, BN folded)",
             lab_ceil, lab_base, lab_ceil),
        ('', '', '', ''),
        (f"training: student steps ({tr_runs['student']['images_per_step']} images/step)",) + header,
        _row(f"noisystudent student (engine.train, {tr_runs['student']['randaugment']}, EMA)",
             tr['img_per_s'], tr_base, tr_ceil),
        _row('noisystudent teacher (engine.train, crop/flip, EMA)', tr.get('teacher_img_per_s'), tr_base, tr_ceil),
        _row('baseline: timm transform, fp32 NCHW, SGD, CE', tr_base, tr_base, tr_ceil),
        _row(f"tuned plain loop: channels_last, {_prec(tr_runs['tuned']['precision'])}",
             tr['tuned_img_per_s'], tr_base, tr_ceil),
        _row(f"ceiling: bare forward+backward ({_prec(tr_runs['ceiling']['precision'])}, channels_last)",
             tr_ceil, tr_base, tr_ceil),
    ]
    lines = [f"noisystudent bench: {s['model']} at {s['image_size'] or 'its own size'}, batch {s['batch_size']}, "
             f"{r['device']}, torch {r['torch']}, {s['num_workers']} workers, "
             f"load {r['load_avg_start']} -> {r['load_avg_end']}"]
    lines.append(text_table(rows, rule=False))
    rss, agree = s['rss_images'], r['agreement']
    lines += [
        '',
        f"student vs the tuned plain loop: {_figure(tr['ratio_to_tuned'], '.2f', 'x')}",
        'project processes keep freed memory (glibc: mmap off, trim above 2 GiB): '
        + ('yes' if tr_runs['student'].get('keeps_freed_memory') else 'no') + '; the plain loops run with the defaults',
        f"labeling peak RSS: {lab['peak_rss_mb']:.0f} MB at {rss[1]} images, {lab['peak_rss_mb_small']:.0f} MB "
        f"at {rss[0]} (ratio {_figure(lab['rss_ratio_8n_vs_n'], '.3f')})",
        f"labels vs the timm docs loop: {_figure(_pct(lab['agreement_with_baseline'], 1.0), '.2f', '%')} same top-1 "
        f"on {lr['baseline']['images']} images",
        f"bf16 vs fp32 top-1 agreement: {_figure(_pct(agree['agreement'], 1.0), '.2f', '%')} of {agree['images']} "
        f"images (fp32 median top-1 probability {_figure(agree['median_top1_prob'], '.4f')})"
        + ('' if s['fast_bf16'] else '; bf16 is emulated and slow here, so labeling runs fp32'),
        f"total {r['seconds']:.0f} s",
    ]
    return '\n'.join(lines)


def _prec(p: str) -> str:
    return 'fp32' if p in ('no', 'fp32', None) else p


def _pct(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return 100.0 * a / b if a is not None and b else None


def _child_ceiling(args: Dict[str, Any]) -> Dict[str, Any]:
    """A ceiling with the process settings the project's own runs make (engine.make_accelerator)."""
    from .runtime import keep_freed_memory

    dev = torch.device(args.pop('device'))
    if dev.type == 'cpu':
        keep_freed_memory()
    measure = inference_ceiling if args.pop('workload') == 'inference' else training_ceiling
    return measure(device=dev, **args)


def _child_student(args: Dict[str, Any]) -> Dict[str, Any]:
    return student_training(folder=Path(args.pop('folder')), out=Path(args.pop('out')), **args)


def _child_teacher(args: Dict[str, Any]) -> Dict[str, Any]:
    return teacher_training(folder=Path(args.pop('folder')), out=Path(args.pop('out')), **args)


# --- scale: million-file folders and ten-million-row selection ---------------------------------

SCALE_CLASSES = 1000  # selection at scale: ImageNet's class count, labels stored as top-k
SCALE_TOPK = 5


def make_linked_folder(root: os.PathLike, n: int, seed: int = 0, per_dir: int = 1000) -> Path:
    """An unlabeled image folder of ``n`` files made of hard links to a few real JPEGs.

    Files go in subfolders of ``per_dir`` (as large sets are kept); a folder made before with
    the same ``n`` is reused. Costs a few MB of disk whatever ``n`` is.
    """
    root = Path(root)
    done = root / '.complete'
    if done.is_file() and done.read_text().strip() == str(n):
        return root / 'images'
    shutil.rmtree(root, ignore_errors=True)
    # a filesystem caps the links to one file (ext4: 65,000): enough distinct images for n
    sources = make_images(root / 'sources', max(8, math.ceil(n / 50_000)), seed=seed, classes=2)
    real = _sorted_files(sources)
    images = root / 'images'
    for d in range(math.ceil(n / per_dir)):
        folder = images / f'{d:05d}'
        folder.mkdir(parents=True)
        for i in range(d * per_dir, min(n, (d + 1) * per_dir)):
            os.link(real[i % len(real)], folder / f'{i:08d}.jpg')
    done.write_text(str(n))
    return images


def _synthetic_raw(out: Path, rows: int, classes: int, topk: int, seed: int, rows_per_shard: int = 1_000_000) -> None:
    """Raw label shards as ``label`` writes them: top-k soft labels for ``rows`` images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .labeling import _META_KEY, _list_array, _map_shard_path, _schema

    raw = out / 'raw'
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    schema = _schema(topk)
    for start in range(0, rows, rows_per_shard):
        stop = min(rows, start + rows_per_shard)
        n = stop - start
        top = np.sort(rng.dirichlet(np.full(topk + 1, 0.3), size=n).astype(np.float32)[:, :topk], axis=1)[:, ::-1]
        idx = np.stack([rng.permutation(classes)[:topk] for _ in range(min(n, 64))])
        idx = idx[rng.integers(0, len(idx), size=n)]
        cols = {'index': pa.array(np.arange(start, stop, dtype=np.int64)), 'topk_idx': _list_array(idx),
                'topk_prob': _list_array(np.ascontiguousarray(top)), 'label': pa.array(idx[:, 0].astype(np.int64)),
                'confidence': pa.array(top[:, 0])}
        meta = {'failed': [], 'consumed': n, 'agree': [0, 0]}
        table = pa.table(cols, schema=schema.with_metadata({_META_KEY: json.dumps(meta).encode()}))
        pq.write_table(table, _map_shard_path(raw, start, stop))


def _child_selection(args: Dict[str, Any]) -> Dict[str, Any]:
    """Selection over synthetic raw shards (``labeling._finish``): seconds and peak RSS."""
    from .config import LabelsConfig
    from .labeling import _finish

    out = Path(args['out'])
    cfg = LabelsConfig(threshold=0.3, per_class='auto', topk=SCALE_TOPK)
    names = [f'class_{i}' for i in range(SCALE_CLASSES)]
    with _PeakRSS() as rss:
        t0 = time.perf_counter()
        stats = _finish(out, cfg, 0, SCALE_CLASSES, SCALE_TOPK, names, 'no', None, None, 'synthetic', '', {
            'input_size': (3, 32, 32)}, 1, args['rows_per_shard'])
        seconds = time.perf_counter() - t0
    return {'seconds': round(seconds, 3), 'peak_rss_mb': round(rss.peak / 2 ** 20, 1),
            'rows_after': stats['rows_after'], 'rows': args['rows']}


def _child_first_step(args: Dict[str, Any]) -> Dict[str, Any]:
    """A student's first optimizer step over pseudo rows of an N-image folder, inside a run's resolution."""
    from .config import DataSource, ModelStage, NoiseConfig, TrainConfig
    from .data import load_source, source_identity, sources_of_run
    from .engine import train

    folder, out = Path(args['folder']), Path(args['out'])
    unlabeled = DataSource(path=str(folder))
    clock = _step_clock()
    with sources_of_run(out / 'sources', {'unlabeled': unlabeled}):
        ds = load_source(unlabeled)
        n = len(ds)
        pseudo = _pseudo_dir(out / 'pseudo', np.arange(0, n, max(1, n // 50_000)), 10, 0)
        stats = json.loads((pseudo / 'stats.json').read_text())
        stats.update(source={'path': str(folder), 'name': None, 'split': 'train', 'image_column': 'image',
                             'label_column': None, 'streaming': False},
                     source_identity=source_identity(ds, 'image', unlabeled))
        (pseudo / 'stats.json').write_text(json.dumps(stats))
        labeled = make_images(out / 'labeled', 64, classes=10)
        stage = ModelStage(model='test_efficientnet', epochs=1, image_size=32, batch_size=8, unlabeled_ratio=1,
                           randaugment='none', dropout=0.0, drop_path=0.0)
        t0 = time.perf_counter()
        train(stage, DataSource(path=str(labeled)), out / 'student', pseudo=pseudo, unlabeled=unlabeled,
              train_cfg=TrainConfig(max_steps=1, min_steps=0, num_workers=0, log_with=[clock]),
              progress=False, noise=NoiseConfig())
        seconds = (clock.times[0] if clock.times else time.perf_counter()) - t0
    return {'seconds': round(seconds, 3)}


def run_scale(sizes: Sequence[int], workdir: Optional[os.PathLike] = None, selection_only: bool = False,
              log=print) -> Dict[str, Any]:
    """``noisystudent bench --scale N``: index, open, labeling set-up, selection and first-step figures."""
    from .data import _folder_split, _index_image_folder, open_index, save_index, source_identity
    from .config import DataSource

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix='noisystudent-scale-'))
    results: Dict[str, Any] = {'device': _device_name(torch.device('cpu')), 'cpu_count': os.cpu_count(),
                               'selection': {'classes': SCALE_CLASSES, 'topk': SCALE_TOPK}, 'sizes': []}
    try:
        for n in sizes:
            if n < 100:
                raise UserError('--scale sizes must be at least 100.')
            row: Dict[str, Any] = {'n': n}
            here = root / f'n{n}'
            if not selection_only:
                log(f'scale {n}: making the folder (hard links)')
                folder = make_linked_folder(here / 'folder', n)
                t0 = time.perf_counter()
                ds = _index_image_folder(folder, progress=False)
                row['index_s'] = round(time.perf_counter() - t0, 3)
                shutil.rmtree(here / 'index', ignore_errors=True)
                save_index(ds, here / 'index')
                del ds
                t0 = time.perf_counter()
                source = DataSource(path=str(folder))
                opened = _folder_split(open_index(here / 'index'), source)
                row['open_s'] = round(time.perf_counter() - t0, 3)
                # labeling set-up: what `label` does before its first batch, on the opened index
                t0 = time.perf_counter()
                source_identity(opened, 'image', source)
                from .labeling import _map_shards
                _map_shards(len(opened), 4096, 0, 1)
                row['label_setup_s'] = round(time.perf_counter() - t0, 3) + row['open_s']
                log(f'scale {n}: index {row["index_s"]} s, open {row["open_s"]} s; the first student step')
                row['first_step_s'] = _in_child('first_step', {'folder': str(folder), 'out': str(here / 'student')},
                                                torch.device('cpu'))['seconds']
            log(f'scale {n}: selection over {n} synthetic rows')
            sel_dir = here / 'labels'
            shutil.rmtree(sel_dir, ignore_errors=True)
            _synthetic_raw(sel_dir, n, SCALE_CLASSES, SCALE_TOPK, seed=0)
            sel = _in_child('selection', {'out': str(sel_dir), 'rows': n, 'rows_per_shard': 1_000_000},
                            torch.device('cpu'))
            shutil.rmtree(sel_dir, ignore_errors=True)
            row.update(selection_s=sel['seconds'], selection_rss_mb=sel['peak_rss_mb'])
            results['sizes'].append(row)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return results


def format_scale(r: Dict[str, Any]) -> str:
    head = ('N', 'index (s)', 'open (s)', 'label set-up (s)', 'selection (s)', 'selection RSS (MB)',
            'first student step (s)')
    rows = [head] + [(f"{x['n']:,}", _figure(x.get('index_s'), '.2f'), _figure(x.get('open_s'), '.2f'),
                      _figure(x.get('label_setup_s'), '.2f'), _figure(x.get('selection_s'), '.2f'),
                      _figure(x.get('selection_rss_mb'), '.0f'), _figure(x.get('first_step_s'), '.2f'))
                     for x in r['sizes']]
    lines = [text_table(rows, left=0)]
    lines.append(f"{r['device']}; selection: {r['selection']['classes']} classes, top-{r['selection']['topk']} "
                 'labels, threshold 0.3, per_class auto')
    return '\n'.join(lines)


_CHILDREN = {'label': _child_label, 'ceiling': _child_ceiling, 'student': _child_student, 'teacher': _child_teacher,
             'selection': _child_selection, 'first_step': _child_first_step}


def _child_main(argv: List[str]) -> int:
    if len(argv) == 3 and argv[0] == '--child' and argv[1] in _CHILDREN:
        from .runtime import keep_freed_memory
        result = _CHILDREN[argv[1]](json.loads(argv[2]))
        result['keeps_freed_memory'] = keep_freed_memory()  # already decided by the run on CPU
        print(json.dumps(result), flush=True)
        return 0
    print('usage: noisystudent bench (this module runs only as the bench\'s child process)', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(_child_main(sys.argv[1:]))
