"""Reproduce the results tables (docs/results.md, the README): the loop with its defaults on the
dev tasks, against a same-budget supervised baseline.

    python scripts/results.py                          # every task but cifar10-1k-7k, every model
    python scripts/results.py --tasks digits --models test_efficientnet
    python scripts/results.py --pretrained --tasks cifar10-1k-10k --out results/
    python scripts/results.py --tasks digits -- labels.threshold=0.5   # overrides for the loop

Tasks (the CIFAR-10 ones read ../shared/data/cifar10, the CIFAR-10 train split as parquet;
the labels of its unlabeled slice only score the pseudo labels):

- digits: scikit-learn's digits at 32 px, 10 labels per class, 1,297 unlabeled, 400 eval (the demo's data);
- cifar10-4k: train[:4000] labeled, train[4000:24000] unlabeled, train[45000:] eval (5,000);
- cifar10-1k: train[:1000] labeled, the same unlabeled and eval slices;
- cifar10-1k-small: train[:1000] labeled, train[4000:6000] unlabeled, train[45000:47000] eval
  (a slice that tf_efficientnet_b0 can run on a 2-core CPU);
- cifar10-4k-small: train[:4000] labeled, train[4000:7000] unlabeled, train[45000:47000] eval;
- cifar10-4k-12k: train[:4000] labeled, train[4000:16000] unlabeled, train[45000:47000] eval;
- cifar10-1k-7k: train[:1000] labeled, train[4000:11000] unlabeled, train[45000:47000] eval.

Pretrained tasks (``--pretrained``), all at 64 px, with the ImageNet EfficientNet-Lite models of
../shared/models: a Lite0 teacher, then Lite1 and Lite2 students, each from its own pretrained weights:

- cifar10-250: 25 labels a class (the first of each class in train[:5000]), train[20000:30000]
  unlabeled, train[45000:47000] eval; cifar10-1k-10k: 100 a class; cifar10-4k-10k: 400 a class;
- digits-64: the digits task at 64 px.

Each run names only the data, the models, ``pretrained`` and the teacher's image_size; every other
key is a default. The baseline is the loop's last model trained alone on the labeled data for as
many optimizer steps as the whole loop took (teacher + every student), with the teacher's other
settings: from scratch, the teacher itself; pretrained, the last student's pretrained backbone, at
the recipe's lr and the alternatives in BASELINE_LRS, the best of them reported, so that a weak
baseline cannot make the loop look good. Run it on a quiet machine:
the wall times are part of the table. ``--work`` keeps the runs: the same command again reuses the
finished stages (a loop run with ``--no-baseline`` gets its baseline that way), and the table then
gives the stages' own seconds instead of the loop's wall time.

``--restarts`` adds a second baseline that has the loop's schedule but no unlabeled data: the
teacher's settings, each stage warm-started from the one before and as many steps long as the
loop's student at its place. The loop against it is what the pseudo-labeled images and the
student's noise add; the loop against the one-schedule baseline also counts what the restarts cost.
"""
import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CIFAR = HERE.parent.parent / 'shared' / 'data' / 'cifar10'

TASKS = {
    'digits': None,  # written by write_demo_data
    'cifar10-4k': {'labeled': 'train[:4000]', 'unlabeled': 'train[4000:24000]', 'eval': 'train[45000:]'},
    'cifar10-1k': {'labeled': 'train[:1000]', 'unlabeled': 'train[4000:24000]', 'eval': 'train[45000:]'},
    # small enough for tf_efficientnet_b0 on a 2-core CPU: its students take one image per labeled one
    'cifar10-1k-small': {'labeled': 'train[:1000]', 'unlabeled': 'train[4000:6000]', 'eval': 'train[45000:47000]'},
    # 4,000 labeled, 3,000 unlabeled, 2,000 eval: cifar10-4k with a smaller unlabeled set (docs/decisions.md)
    'cifar10-4k-small': {'labeled': 'train[:4000]', 'unlabeled': 'train[4000:7000]', 'eval': 'train[45000:47000]'},
    # 4,000 labeled, 12,000 unlabeled, 2,000 eval: about as many unlabeled images as 63 student steps
    # an epoch take at unlabeled_ratio 3 (12,096), so a student costs what cifar10-4k-small's does (docs/decisions.md)
    'cifar10-4k-12k': {'labeled': 'train[:4000]', 'unlabeled': 'train[4000:16000]', 'eval': 'train[45000:47000]'},
    # 1,000 labeled, 7,000 unlabeled, 2,000 eval, as in the collapse report (docs/decisions.md); with -- teacher.epochs=40
    'cifar10-1k-7k': {'labeled': 'train[:1000]', 'unlabeled': 'train[4000:11000]', 'eval': 'train[45000:47000]'},
}
MODELS = ('test_efficientnet', 'lcnet_050', 'tinynet_e', 'tf_efficientnet_b0')

SHARED_MODELS = HERE.parent.parent / 'shared' / 'models'
PT_CHAIN = ('tf_efficientnet_lite0.in1k', 'tf_efficientnet_lite1.in1k', 'tf_efficientnet_lite2.in1k')
PT_SIZE = 64
PT_UNLABELED, PT_EVAL = 'train[20000:30000]', 'train[45000:47000]'
PT_TASKS = {'digits-64': None, 'cifar10-250': 25, 'cifar10-1k-10k': 100, 'cifar10-4k-10k': 400}  # labels a class
# the labels-only baseline tries the recipe's lr and these, and reports the best
BASELINE_LRS = (3e-4,)


def _data(task: str, work: Path, cifar: Path):
    if task in ('digits', 'digits-64'):
        from timm_noisystudent.demo import write_demo_data
        root = work / 'digits-data'
        write_demo_data(root)
        return ({'path': str(root / 'labeled')}, {'path': str(root / 'unlabeled')}, {'path': str(root / 'test')},
                lambda: _digits_truth(root))
    if not (cifar / 'train.parquet').is_file():
        sys.exit(f'{cifar} has no train.parquet; pass --cifar DIR')
    if task in PT_TASKS:
        labeled = {'path': str(_per_class(cifar, PT_TASKS[task], work / f'{task}-labeled'))}
        src = {k: {'path': str(cifar), 'split': v} for k, v in (('unlabeled', PT_UNLABELED), ('eval', PT_EVAL))}
        return labeled, src['unlabeled'], src['eval'], lambda: _source_truth(src['unlabeled'])
    s = TASKS[task]
    src = {k: {'path': str(cifar), 'split': v} for k, v in s.items()}
    return src['labeled'], src['unlabeled'], src['eval'], lambda: _source_truth(src['unlabeled'])


def _per_class(cifar: Path, n: int, out: Path) -> Path:
    """The first ``n`` images of each class in train[:5000], as a parquet folder (balanced labels)."""
    import datasets
    if not (out / 'train.parquet').is_file():
        ds = datasets.load_dataset(str(cifar), split='train[:5000]')
        labels = np.asarray(ds['label'])
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(int(labels.max()) + 1)]))
        out.mkdir(parents=True, exist_ok=True)
        ds.select(keep).to_parquet(str(out / 'train.parquet'))
    return out


def _digits_truth(root: Path) -> np.ndarray:
    import datasets
    hidden = json.loads((root / 'hidden_labels.json').read_text())
    ds = datasets.load_dataset(str(root / 'unlabeled'), split='train').cast_column('image', datasets.Image(decode=False))
    return np.array([hidden[Path(v['path']).name] for v in ds['image']])


def _source_truth(source) -> np.ndarray:
    from timm_noisystudent.data import as_source, load_source
    return np.asarray(load_source(as_source(source))['label'])


def _pseudo_accuracy(labels_dir: Path, truth: np.ndarray) -> float:
    """Top-1 of the teacher's pseudo labels over every unlabeled image, against the hidden labels."""
    from timm_noisystudent.labeling import read_raw
    raw = read_raw(labels_dir).select_columns(['index', 'label'])
    index, label = np.asarray(raw['index']), np.asarray(raw['label'])
    return round(100.0 * float((truth[index] == label).mean()), 2)


def _chain(task: str, model: str, pretrained: bool, models_dir: Path):
    if pretrained:
        return [f'local-dir:{models_dir / name}' for name in PT_CHAIN]
    return [model, model, model]


def run_task(task: str, model: str, work: Path, cifar: Path, overrides, baseline: bool,
             restarts: bool = False, pretrained: bool = False, models_dir: Path = SHARED_MODELS) -> dict:
    import datasets
    from timm_noisystudent.config import apply_overrides, config_from_dict, config_hash
    from timm_noisystudent.pipeline import run, students_beat_teachers
    from timm_noisystudent.rundir import stage_kind

    datasets.disable_progress_bars()
    labeled, unlabeled, eval_, truth = _data(task, work, cifar)
    chain = _chain(task, model, pretrained, models_dir)
    out = work / (f'{task}-pretrained' if pretrained else f'{task}-{model}')
    teacher = {'model': chain[0], 'image_size': PT_SIZE if pretrained else 32}
    if pretrained:
        teacher['pretrained'] = True
    cfg = config_from_dict(apply_overrides({
        'labeled': labeled, 'unlabeled': unlabeled, 'eval': eval_,
        'teacher': teacher, 'students': [{'model': m} for m in chain[1:]],
        'output': str(out / 'loop'),
    }, overrides))
    t0 = time.perf_counter()
    summary = run(cfg, progress=False)
    loop_seconds = time.perf_counter() - t0
    truth_labels = truth()
    rows = summary['stages']
    loop_seconds = _loop_wall(out, rows, loop_seconds)
    result = {
        'task': task, 'model': 'lite0-lite1-lite2' if pretrained else model, 'overrides': list(overrides),
        'loop_seconds': round(loop_seconds, 1),
        'stages': [{k: _short(r.get(k), models_dir) if k == 'model' else r.get(k)
                    for k in ('stage', 'model', 'teacher', 'top1', 'steps', 'pseudo_images', 'seconds')}
                   for r in rows],
        'pseudo_accuracy': {r['stage']: _pseudo_accuracy(out / 'loop' / r['stage'], truth_labels)
                            for r in rows if stage_kind(r['stage']) == 'labels'},
        'final_stage': summary['final_stage'],
        'students_beat_teachers': students_beat_teachers(summary),
        'meta': _meta(cfg, config_hash, pretrained, chain),
    }
    models = [r for r in rows if stage_kind(r['stage']) != 'labels']
    total_steps = sum(r['steps'] or 0 for r in models)
    if baseline:
        result['baselines'] = [dict(b, model=_short(b['model'], models_dir))
                               for b in _baselines(cfg, out, total_steps, pretrained)]
        result['baseline'] = max(result['baselines'], key=lambda b: b['top1'])
    if restarts:
        result['restarts'] = _restarts(cfg, out, models)
    first, last = models[0]['top1'], models[-1]['top1']
    result['teacher_error'] = round(100 - first, 2)
    result['last_student_error'] = round(100 - last, 2)
    result['error_ratio'] = round((100 - last) / max(100 - first, 1e-9), 3)
    return result


def _short(model, models_dir: Path):
    """A model id as the results may show it: a local directory relative to the repository, never absolute."""
    import os
    prefix = f'local-dir:{models_dir}'
    if isinstance(model, str) and model.startswith(prefix):
        return 'local-dir:' + os.path.relpath(model[len('local-dir:'):], HERE.parent)
    return model


def _loop_wall(out: Path, rows, seconds: float) -> float:
    """The loop's wall time: this call's when it trained every stage, else the one kept from the call that did.

    A rerun with the same --work reuses finished stages (to add a baseline to a --no-baseline run); its own wall
    time is not the loop's, so the first call's is kept in the work directory next to the stages it timed.
    """
    kept = out / 'loop-wall.json'
    signature = [[r.get('stage'), r.get('top1'), r.get('steps')] for r in rows]
    own = sum(r.get('seconds') or 0 for r in rows)
    if seconds >= 0.9 * own:
        kept.write_text(json.dumps({'seconds': round(seconds, 1), 'stages': signature}))
        return seconds
    try:
        earlier = json.loads(kept.read_text())
    except (OSError, ValueError):
        return seconds
    return earlier['seconds'] if earlier.get('stages') == signature else seconds


def _baselines(cfg, out: Path, total_steps: int, pretrained: bool) -> list:
    """Labels only, the loop's optimizer steps: the teacher's settings, or the last student's pretrained backbone."""
    from timm_noisystudent.config import PRESETS, preset_of
    from timm_noisystudent.engine import train

    if not pretrained:
        stages = [(cfg.teacher, 'baseline')]
    else:
        last = replace(cfg.students[-1], pretrained=True, image_size=cfg.teacher.image_size, epochs=None)
        recipe_lr = PRESETS[preset_of(cfg.train, True)]['lr']
        lrs = sorted({recipe_lr, *BASELINE_LRS})
        stages = [(replace(last, lr=lr), f'baseline-lr{lr:g}') for lr in lrs]
    results = []
    for stage, name in stages:
        t0 = time.perf_counter()
        metrics = train(stage, cfg.labeled, out / name, eval_data=cfg.eval,
                        train_cfg=replace(cfg.train, min_steps=total_steps), noise=cfg.noise, seed=cfg.seed,
                        resume=True, progress=False)
        results.append({'model': stage.model, 'lr': metrics['lr'], 'epochs': metrics['epochs'],
                        'steps': metrics['step'], 'top1': metrics['top1'],
                        'seconds': round(time.perf_counter() - t0, 1)})
    return results


def _meta(cfg, config_hash, pretrained: bool, chain) -> dict:
    """Where and with what a result was made: the commit, the machine, the libraries."""
    import os
    import platform
    import subprocess
    import timm
    import torch
    from timm_noisystudent.config import config_to_dict

    def git(*args):
        try:
            return subprocess.run(['git', *args], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    cpu = platform.processor() or platform.machine()
    flags = []
    try:
        text = Path('/proc/cpuinfo').read_text()
        cpu = next((l.split(':', 1)[1].strip() for l in text.splitlines() if l.startswith('model name')), cpu)
        have = set(next((l.split(':', 1)[1].split() for l in text.splitlines() if l.startswith('flags')), []))
        flags = sorted(have & {'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile'})
    except OSError:
        pass
    return {'commit': git('rev-parse', '--short=12', 'HEAD'), 'dirty': bool(git('status', '--porcelain', '--',
                                                                                 '../timm_noisystudent')),
            'date': time.strftime('%Y-%m-%d'), 'config_hash': config_hash(config_to_dict(cfg)),
            'machine': {'cpu': cpu, 'cores': os.cpu_count(), 'flags': flags, 'gpu': torch.cuda.is_available()},
            'torch': torch.__version__, 'timm': timm.__version__, 'pretrained': pretrained,
            'image_size': cfg.teacher.image_size, 'models': [str(m).split('/')[-1] for m in chain]}


def _restarts(cfg, out: Path, models) -> dict:
    """The loop's schedule without unlabeled data: the teacher's settings warm-started stage by stage."""
    from timm_noisystudent.engine import train

    t0 = time.perf_counter()
    start, top1 = out / 'loop' / models[0]['stage'] / 'model', []
    for k, row in enumerate(models[1:], start=1):
        d = out / f'restart{k}'
        metrics = train(cfg.teacher, cfg.labeled, d, eval_data=cfg.eval, noise=cfg.noise, seed=cfg.seed + k,
                        train_cfg=replace(cfg.train, min_steps=row['steps']), resume=True, progress=False,
                        init_from=start)
        start = d / 'model'
        top1.append(metrics['top1'])
    return {'top1': top1, 'seconds': round(time.perf_counter() - t0, 1)}


def _f(value, unit='') -> str:
    return '-' if value is None else f'{value:.2f}{unit}'


def markdown(results) -> str:
    lines = []
    for r in results:
        st = {s['stage']: s for s in r['stages']}
        own = sum(s.get('seconds') or 0 for s in r['stages'])
        # a rerun with the same --work reuses finished stages: its wall time is not the loop's
        loop = (f"loop {r['loop_seconds']:.0f} s" if r['loop_seconds'] >= own
                else f"loop reused from --work, its stages' own seconds {own:.0f} s")
        lines.append(f"**{r['task']}, {r['model']}** ({loop}"
                     + (f", baseline {r['baseline']['seconds']:.0f} s" if 'baseline' in r else '') + ')')
        lines.append('')
        lines.append('| stage | teacher | top-1 | steps | pseudo rows | pseudo-label acc. |')
        lines.append('|---|---|---|---|---|---|')
        for s in r['stages']:
            acc = r['pseudo_accuracy'].get(s['stage'])
            final = ' (final)' if s['stage'] == r['final_stage'] else ''
            lines.append(f"| {s['stage']}{final} | {s['teacher'] or '-'} | {_f(s['top1'])} | {s['steps'] or '-'} | "
                         f"{s['pseudo_images'] or '-'} | {_f(acc, '%')} |")
        for b in r.get('baselines') or ([r['baseline']] if 'baseline' in r else []):
            lr = f", lr {b['lr']:g}" if b.get('lr') is not None else ''
            lines.append(f"| same-budget baseline{lr} | - | {b['top1']:.2f} | {b['steps']} | - | - |")
        if 'restarts' in r:
            top1 = ' -> '.join(_f(t) for t in r['restarts']['top1'])
            steps = ' + '.join(str(s['steps']) for s in r['stages'][1:] if s['steps'])  # the students'
            lines.append(f"| the loop's restarts, no unlabeled data | iter0-teacher | {top1} | {steps} | - | - |")
        lines.append('')
        verdict = f"last student's error / teacher's: {r['error_ratio']:.3f}; every student beat its teacher: " + (
            'yes' if r['students_beat_teachers'] else 'no')
        if 'baseline' in r:
            beats = st[r['final_stage']]['top1'] > r['baseline']['top1']
            verdict += f"; the loop {'beats' if beats else 'does not beat'} the same-budget baseline"
        lines.append(verdict)
        lines.append('')
    return '\n'.join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tasks', nargs='+', choices=list(TASKS) + [t for t in PT_TASKS if t not in TASKS],
                   help='default: every task but cifar10-1k-7k; with --pretrained, every pretrained task')
    p.add_argument('--pretrained', action='store_true',
                   help='the pretrained chain: a Lite0 teacher, Lite1 and Lite2 students, at 64 px')
    p.add_argument('--models-dir', default=str(SHARED_MODELS), help='where the Lite model directories are')
    p.add_argument('--models', nargs='+', default=list(MODELS))
    p.add_argument('--work', default='runs/results',
                   help='where the runs go; the same --work again reuses their finished stages')
    p.add_argument('--cifar', default=str(CIFAR), help='the CIFAR-10 parquet directory')
    p.add_argument('--no-baseline', action='store_true', help='the loop only, without its same-budget baseline')
    p.add_argument('--restarts', action='store_true',
                   help="also train the loop's schedule without unlabeled data (teacher settings, warm restarts)")
    p.add_argument('--json', help='append each result to this JSON-lines file')
    p.add_argument('--out', help='write each result as its own JSON file in this directory (results/ is rendered '
                   'into the docs by scripts/render_docs.py)')
    p.add_argument('overrides', nargs='*', help='key=value overrides for the loop (after --)')
    args = p.parse_args()
    work = Path(args.work)
    tasks = args.tasks or (list(PT_TASKS) if args.pretrained else [t for t in TASKS if t != 'cifar10-1k-7k'])
    models = ['lite'] if args.pretrained else args.models
    for task in tasks:
        for model in models:
            r = run_task(task, model, work, Path(args.cifar), args.overrides, not args.no_baseline, args.restarts,
                         pretrained=args.pretrained, models_dir=Path(args.models_dir))
            if args.json:
                with open(args.json, 'a') as f:
                    f.write(json.dumps(r) + '\n')
            if args.out:
                seed = next((o.split('=', 1)[1] for o in args.overrides if o.startswith('seed=')), '0')
                path = Path(args.out) / f"{r['task']}-{r['model']}-seed{seed}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(r, indent=1) + '\n')
            print(markdown([r]), flush=True)


if __name__ == '__main__':
    main()
