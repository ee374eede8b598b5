"""Reproduce the README's results tables: the loop with its defaults on the dev tasks, against a
same-budget supervised baseline.

    python scripts/results.py                          # every task but cifar10-1k-7k, every model
    python scripts/results.py --tasks digits --models test_efficientnet
    python scripts/results.py --out results/ -- labels.threshold=0.5   # overrides for the loop

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

Each run names only the data, the model and image_size (32); every other key is a default. The
baseline is the teacher trained alone on the labeled data for as many optimizer steps as the whole
loop took (teacher + every student), with the teacher's other settings. Run it on a quiet machine:
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
    # 4,000 labeled, 3,000 unlabeled, 2,000 eval: cifar10-4k with a smaller unlabeled set (README)
    'cifar10-4k-small': {'labeled': 'train[:4000]', 'unlabeled': 'train[4000:7000]', 'eval': 'train[45000:47000]'},
    # 4,000 labeled, 12,000 unlabeled, 2,000 eval: about as many unlabeled images as 63 student steps
    # an epoch take at unlabeled_ratio 3 (12,096), so a student costs what cifar10-4k-small's does (README)
    'cifar10-4k-12k': {'labeled': 'train[:4000]', 'unlabeled': 'train[4000:16000]', 'eval': 'train[45000:47000]'},
    # 1,000 labeled, 7,000 unlabeled, 2,000 eval, as in the collapse report (README); with -- teacher.epochs=40
    'cifar10-1k-7k': {'labeled': 'train[:1000]', 'unlabeled': 'train[4000:11000]', 'eval': 'train[45000:47000]'},
}
MODELS = ('test_efficientnet', 'lcnet_050', 'tinynet_e', 'tf_efficientnet_b0')


def _data(task: str, work: Path, cifar: Path):
    if task == 'digits':
        from timm_noisystudent.demo import write_demo_data
        root = work / 'digits-data'
        write_demo_data(root)
        return ({'path': str(root / 'labeled')}, {'path': str(root / 'unlabeled')}, {'path': str(root / 'test')},
                lambda: _digits_truth(root))
    if not (cifar / 'train.parquet').is_file():
        sys.exit(f'{cifar} has no train.parquet; pass --cifar DIR')
    s = TASKS[task]
    src = {k: {'path': str(cifar), 'split': v} for k, v in s.items()}
    return src['labeled'], src['unlabeled'], src['eval'], lambda: _source_truth(src['unlabeled'])


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


def run_task(task: str, model: str, work: Path, cifar: Path, overrides, baseline: bool,
             restarts: bool = False) -> dict:
    import datasets
    from timm_noisystudent.config import apply_overrides, config_from_dict
    from timm_noisystudent.engine import train
    from timm_noisystudent.pipeline import run, students_beat_teachers
    from timm_noisystudent.rundir import stage_kind

    datasets.disable_progress_bars()
    labeled, unlabeled, eval_, truth = _data(task, work, cifar)
    out = work / f'{task}-{model}'
    cfg = config_from_dict(apply_overrides({
        'labeled': labeled, 'unlabeled': unlabeled, 'eval': eval_,
        'teacher': {'model': model, 'image_size': 32},
        'students': [{'model': model}, {'model': model}],
        'output': str(out / 'loop'),
    }, overrides))
    t0 = time.perf_counter()
    summary = run(cfg, progress=False)
    loop_seconds = time.perf_counter() - t0
    truth_labels = truth()
    rows = summary['stages']
    result = {
        'task': task, 'model': model, 'overrides': list(overrides), 'loop_seconds': round(loop_seconds, 1),
        'stages': [{k: r.get(k) for k in ('stage', 'teacher', 'top1', 'steps', 'pseudo_images', 'seconds')}
                   for r in rows],
        'pseudo_accuracy': {r['stage']: _pseudo_accuracy(out / 'loop' / r['stage'], truth_labels)
                            for r in rows if stage_kind(r['stage']) == 'labels'},
        'final_stage': summary['final_stage'],
        'students_beat_teachers': students_beat_teachers(summary),
    }
    models = [r for r in rows if stage_kind(r['stage']) != 'labels']
    total_steps = sum(r['steps'] or 0 for r in models)
    teacher = models[0]
    if baseline:
        # the teacher's settings, its epochs repeated up to the loop's total optimizer steps
        t0 = time.perf_counter()
        metrics = train(cfg.teacher, cfg.labeled, out / 'baseline', eval_data=cfg.eval,
                        train_cfg=replace(cfg.train, min_steps=total_steps), noise=cfg.noise, seed=cfg.seed,
                        resume=True, progress=False)
        result['baseline'] = {'epochs': metrics['epochs'], 'steps': metrics['step'], 'top1': metrics['top1'],
                              'seconds': round(time.perf_counter() - t0, 1)}
    if restarts:
        result['restarts'] = _restarts(cfg, out, models)
    last = models[-1]['top1']
    result['teacher_error'] = round(100 - teacher['top1'], 2)
    result['last_student_error'] = round(100 - last, 2)
    result['error_ratio'] = round((100 - last) / max(100 - teacher['top1'], 1e-9), 3)
    return result


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
        if 'baseline' in r:
            b = r['baseline']
            lines.append(f"| same-budget baseline | - | {b['top1']:.2f} | {b['steps']} | - | - |")
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
    p.add_argument('--tasks', nargs='+', default=[t for t in TASKS if t != 'cifar10-1k-7k'], choices=list(TASKS),
                   help='default: every task but cifar10-1k-7k')
    p.add_argument('--models', nargs='+', default=list(MODELS))
    p.add_argument('--work', default='runs/results',
                   help='where the runs go; the same --work again reuses their finished stages')
    p.add_argument('--cifar', default=str(CIFAR), help='the CIFAR-10 parquet directory')
    p.add_argument('--no-baseline', action='store_true', help='the loop only, without its same-budget baseline')
    p.add_argument('--restarts', action='store_true',
                   help="also train the loop's schedule without unlabeled data (teacher settings, warm restarts)")
    p.add_argument('--json', help='append each result to this JSON-lines file')
    p.add_argument('overrides', nargs='*', help='key=value overrides for the loop (after --)')
    args = p.parse_args()
    work = Path(args.work)
    results = []
    for task in args.tasks:
        for model in args.models:
            r = run_task(task, model, work, Path(args.cifar), args.overrides, not args.no_baseline, args.restarts)
            results.append(r)
            if args.json:
                with open(args.json, 'a') as f:
                    f.write(json.dumps(r) + '\n')
            print(markdown([r]), flush=True)


if __name__ == '__main__':
    main()
