"""The ``noisystudent`` command: argument parsing and nothing else.

Every subcommand is a thin call into the library. A ``UserError`` becomes a one-line message
and exit code 2; ``--debug`` shows the traceback instead.
"""
import argparse
import errno
import json
import os
import sys
import warnings
from typing import List, Optional

from .config import (DEFAULT_TOPK, FULL_PROBS_MAX_CLASSES, MIXED_PRECISION_CHOICES, PRESET_CHOICES,
                     PRESET_EPOCHS, PRESET_MIN_STEPS, PRESET_STUDENT_EPOCHS, PRESETS, LabelsConfig,
                     TrainConfig, UserError)


def _print_main(text: str) -> None:
    # under `accelerate launch` every process runs the command; only one should talk
    if _is_main_process():
        print(text, flush=True)


def _at_least(args, low: int, *names: str) -> None:
    """Integer flags below their minimum are one-line errors, before anything loads."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")


def _cmd_models(args) -> None:
    from .files import text_table
    from .models import NS_RECIPES, count_params

    def fmt(v):
        return '-' if v is None else f'{v:.1f}'

    rows = [('model', 'train px', 'test px', 'params (M)', 'top-1', 'top-1 NS', 'RandAugment', 'dropout', 'ratio')]
    for name, r in NS_RECIPES.items():
        rows.append((name, str(r.train_size), str(r.test_size), f'{count_params(name) / 1e6:.1f}',
                     fmt(r.top1_baseline), fmt(r.top1_ns), r.randaugment or 'none', f'{r.dropout:g}',
                     str(r.unlabeled_ratio)))
    if args.json:
        _print_main(json.dumps({name: r.to_dict() for name, r in NS_RECIPES.items()}, indent=2))
        return
    _print_main(text_table(rows) + '\ntop-1: ImageNet, arXiv 1911.04252; "-" where the paper reports none.')


def _cmd_predict(args) -> None:
    from .models import load_model, predict

    _at_least(args, 1, 'top_k')
    model = load_model(args.model, pretrained=not args.no_pretrained, checkpoint=args.checkpoint,
                       allow_pickle=args.allow_pickle)
    results = predict(model, args.images, top_k=args.top_k)
    if args.json:
        _print_main(json.dumps(results, indent=2))
        return
    _print_main(_predictions_table(results))


def _predictions_table(results) -> str:
    """One header row, then a row per prediction; the image is named on its first row."""
    width = max([len('image')] + [len(str(res['image'])) for res in results])
    lines = [f"{'image':<{width}}  rank  probability  class  label"]
    for res in results:
        for rank, p in enumerate(res['predictions'], start=1):
            image = str(res['image']) if rank == 1 else ''
            lines.append(f"{image:<{width}}  {rank:>4}  {p['probability'] * 100:10.2f}%  {p['index']:>5}  {p['label']}")
    return '\n'.join(lines)


def _source(path, split, image_column=None, label_column=None, name=None):
    from .config import DataSource
    return DataSource(path=path, name=name, split=split or _eval_split(path), image_column=image_column,
                      label_column=label_column)


def _eval_split(path: str) -> str:
    # a local folder or parquet dir loads as one `train` split; Hub datasets usually have `test`
    import os
    return 'train' if os.path.exists(os.path.expanduser(path)) else 'test'


def _train_settings(args):
    """TrainConfig and NoiseConfig from --config YAML (its train: and noise: sections), then flags."""
    from .config import NoiseConfig, TrainConfig, from_dict, read_config_dict

    loaded = read_config_dict(args.config) if args.config else {}
    unknown = set(loaded) - {'train', 'noise'}
    if unknown:
        raise UserError(f"--config for `train` takes the sections train: and noise:, not {', '.join(sorted(unknown))}.")
    train = dict(loaded.get('train') or {})
    noise = dict(loaded.get('noise') or {})
    for key in ('epochs', 'batch_size', 'lr', 'mixed_precision', 'preset', 'ema_decay', 'clip_grad', 'num_workers',
                'checkpoint_every', 'min_steps', 'max_steps', 'grad_accum_steps', 'log_with', 'unlabeled_ratio'):
        if getattr(args, key, None) is not None:
            train[key] = getattr(args, key)
    if args.compile:
        train['compile'] = True
    for key in ('randaugment', 'dropout', 'drop_path'):
        if getattr(args, key, None) is not None:
            noise[key] = getattr(args, key)
    return from_dict(TrainConfig, train, 'train'), from_dict(NoiseConfig, noise, 'noise')


def _cmd_train(args) -> None:
    from .config import ModelStage
    from .engine import train
    from .runtime import Preempted

    _at_least(args, 1, 'image_size')
    _at_least(args, 0, 'freeze_blocks')
    train_cfg, noise = _train_settings(args)
    if args.randaugment is not None:
        from .augment import NoiseSpecError, parse_noise_spec
        try:
            parse_noise_spec(args.randaugment)
        except NoiseSpecError as e:
            raise UserError(f'--randaugment: {e}') from None
        if not args.pseudo:
            warnings.warn('--randaugment is student noise; a teacher (no --pseudo) trains without it.')
    stage = ModelStage(model=args.model, pretrained=args.pretrained, epochs=train_cfg.epochs,
                       image_size=args.image_size)
    unlabeled = _source(args.unlabeled_data, args.unlabeled_split) if args.unlabeled_data else None
    eval_data = _source(args.eval_data, args.eval_split, args.image_column, args.label_column) \
        if args.eval_data else None
    try:
        metrics = train(
            stage, _source(args.data, args.split, args.image_column, args.label_column), args.output,
            eval_data=eval_data, pseudo=args.pseudo, unlabeled=unlabeled, train_cfg=train_cfg, noise=noise,
            seed=args.seed, resume=args.resume, freeze_blocks=args.freeze_blocks, allow_pickle=args.allow_pickle,
            init_from=args.init_from, progress=_progress(args))
    except Preempted as e:
        again = 'again' if args.resume else 'again with --resume'
        raise Preempted(f'{e} Run the same command {again} to continue.', e.signal) from None
    top1 = '-' if metrics['top1'] is None else f"{metrics['top1']:.2f}"
    top5 = '-' if metrics['top5'] is None else f"{metrics['top5']:.2f}"
    _print_main(f"{'student' if args.pseudo else 'teacher'} {metrics['model']}: top-1 {top1}  top-5 {top5}  "
                f"({metrics['img_per_s']:.1f} training img/s over the stage, evaluations included) "
                f"-> {args.output}/model")


def _progress(args) -> bool:
    """Whether bars show; --no-progress also turns off datasets' own bars for the command."""
    if args.no_progress:
        import datasets
        datasets.disable_progress_bars()
    return not args.no_progress


def _cmd_eval(args) -> None:
    from .engine import evaluate_model

    _at_least(args, 1, 'batch_size', 'image_size')
    _at_least(args, 0, 'num_workers')
    _progress(args)
    metrics = evaluate_model(args.model, _source(args.data, args.split, args.image_column, args.label_column),
                             batch_size=args.batch_size, image_size=args.image_size,
                             mixed_precision=args.mixed_precision, num_workers=args.num_workers,
                             allow_pickle=args.allow_pickle)
    if args.json:
        _print_main(json.dumps(metrics))
    else:
        _print_main(f"top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  loss {metrics['loss']:.4f}  "
                    f"({metrics['images']} images, {metrics['skipped']} skipped)")


def _per_class_arg(text: str):
    return int(text) if text.isdigit() else text


def _cmd_label(args) -> None:
    from .config import LabelsConfig, from_dict
    from .runtime import Preempted
    from .labeling import label

    _at_least(args, 1, 'rows_per_shard', 'image_size')
    _at_least(args, 0, 'num_workers')
    settings = {'soft': not args.hard, 'temperature': args.temperature, 'threshold': args.threshold,
                'per_class': args.per_class, 'topk': args.topk, 'batch_size': args.batch_size,
                'mixed_precision': args.mixed_precision}
    cfg = from_dict(LabelsConfig, {k: v for k, v in settings.items() if v is not None})
    source = _source(args.data, args.split, args.image_column)
    if args.streaming:
        source.streaming = True
    try:
        stats = label(args.teacher, source, args.output, cfg, seed=args.seed, num_workers=args.num_workers,
                      image_size=args.image_size, rows_per_shard=args.rows_per_shard, allow_pickle=args.allow_pickle,
                      progress=_progress(args))
    except Preempted as e:
        raise Preempted(f'{e} Run the same command again to continue.', e.signal) from None
    target = 'no balancing' if stats['per_class_target'] is None else f"{stats['per_class_target']} per class"
    _print_main(f"labeled {stats['rows_labeled']} images ({stats['failed_count']} undecodable, "
                f"{stats['rows_resumed']} from earlier shards) at {stats['img_per_s']:.1f} img/s; "
                f"kept {stats['rows_before']} with confidence >= {stats['threshold']:g}, "
                f"{stats['rows_after']} after balancing ({target}) -> {args.output}/data")


def _is_main_process() -> bool:
    # printing, exports and pushes happen once, not once per `accelerate launch` process
    from .runtime import process_state
    return process_state().is_main_process


def _cmd_export(args) -> None:
    from .hub import export

    if _is_main_process():
        out = export(args.src, args.out, repo_id=args.repo_id, license=args.license, allow_pickle=args.allow_pickle)
        _print_main(f'exported {args.src} -> {out} (model.safetensors, config.json, README.md)')


def _pushed(info) -> str:
    return f'pull request: {info.pr_url}' if info.pr_url else f'commit: {info.commit_url}'


def _say_pushed(args, what: str, where: str, info) -> None:
    if args.create_pr and not info.pr_url:  # huggingface_hub skips a commit that changes nothing
        _print_main(f"nothing to push: {what}'s files equal those on {args.revision or 'main'} of {where}; "
                    f'no pull request opened (latest commit: {info.commit_url})')
    else:
        _print_main(f'pushed {what} to {where}; {_pushed(info)}')


def _cmd_push(args) -> None:
    from .hub import push

    if _is_main_process():
        info = push(args.src, args.repo_id, private=args.private, revision=args.revision,
                    create_pr=args.create_pr, commit_message=args.commit_message, license=args.license)
        _say_pushed(args, args.src, args.repo_id, info)


def _cmd_push_labels(args) -> None:
    from .hub import push_labels

    if _is_main_process():
        info = push_labels(args.labels_dir, args.repo_id, private=args.private, revision=args.revision,
                           create_pr=args.create_pr, commit_message=args.commit_message, license=args.license)
        _say_pushed(args, args.labels_dir, f'dataset {args.repo_id}', info)


def _add_push_args(p) -> None:
    p.add_argument('--repo-id', required=True, help='ORG/NAME on the Hub (created if missing)')
    p.add_argument('--private', action='store_true', help='create the repo private (an existing repo keeps its visibility)')
    p.add_argument('--revision', help='branch to push to (created from main if missing), or refs/pr/N')
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing to the branch')
    p.add_argument('--commit-message', help='the commit message (default: one that names what is uploaded)')
    p.add_argument('--license', help="license in the card metadata (default: a model's own, else apache-2.0; "
                                     "'other' for pseudo labels)")


def _cmd_run(args) -> None:
    from .config import (apply_overrides, clip_note, config_from_dict, config_to_yaml, epochs_note, lr_note,
                         presets_note, read_config_dict)
    from .pipeline import run

    cfg = config_from_dict(apply_overrides(read_config_dict(args.config), args.overrides))
    if args.output:
        cfg.output = args.output
    if args.print_config:
        _check_printed(cfg)
        _print_main(config_to_yaml(cfg).rstrip() + '\n' + presets_note(cfg) + lr_note(cfg) + clip_note(cfg)
                    + epochs_note(cfg))
        return
    run(cfg, restart_from=args.restart_from, progress=not args.no_progress)


def _check_printed(cfg) -> None:
    """--print-config refuses what `run` refuses before its teacher trains (a bad model name, noise spec,
    tracker or hub.repo_id), all but a missing token, which printing does not need."""
    from dataclasses import replace

    from .hub import check_repo_id
    from .pipeline import _check_before_training
    if cfg.hub.repo_id:
        try:
            check_repo_id(cfg.hub.repo_id)
        except UserError as e:
            raise UserError(f'hub.repo_id: {e}') from None
    _check_before_training(replace(cfg, hub=replace(cfg.hub, repo_id=None)))


def _cmd_demo(args) -> None:
    from .demo import demo

    demo(args.output, progress=not args.no_progress)


def _cmd_bench(args) -> None:
    from .bench import format_scale, format_table, run_bench, run_scale

    if args.scale:
        results = run_scale(args.scale, workdir=args.workdir, selection_only=args.selection_only,
                            log=lambda msg: print(msg, file=sys.stderr, flush=True))
        if args.json:
            from .files import write_json_atomic
            write_json_atomic(args.json, results)
        print(format_scale(results), flush=True)
        return

    results = run_bench(n=args.n, model=args.model, batch_size=args.batch_size, device=args.device,
                        image_size=args.image_size, num_workers=args.num_workers, workdir=args.workdir,
                        seed=args.seed, train_steps=args.train_steps,
                        log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.json:
        from .files import write_json_atomic
        write_json_atomic(args.json, results)
    print(format_table(results), flush=True)


def _add_data_args(p, required=True) -> None:
    p.add_argument('--data', required=required, help='dataset: Hub id, image folder, parquet dir or save_to_disk dir')
    p.add_argument('--split', default='train', help='split, slicing allowed: train[:10%%]')
    p.add_argument('--image-column', help='image column (default: detected)')
    p.add_argument('--label-column', help='label column (default: detected)')


def _add_allow_pickle(p) -> None:
    p.add_argument('--allow-pickle', action='store_true',
                   help='accept pickled weights (.bin, .pth) from a source you trust; only tensors are '
                        'unpickled (torch.load with weights_only=True)')


def _version() -> str:
    # the installed distribution's version; a source tree that is not installed has the package's own
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version('timm-noisystudent')
    except PackageNotFoundError:
        from . import __version__
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='noisystudent', description='Noisy Student Training for timm models.')
    parser.add_argument('--debug', action='store_true', help='show tracebacks instead of one-line errors')
    parser.add_argument('--version', action='version', version=f'%(prog)s {_version()}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)

    p = sub.add_parser('models', help='list the tf_efficientnet_*_ns variants and their recipes')
    p.add_argument('--json', action='store_true', help='print the recipes as JSON')
    p.set_defaults(fn=_cmd_models)

    p = sub.add_parser('predict', help='top-k classes of images')
    p.add_argument('images', nargs='+', metavar='IMAGE', help='image files to classify')
    p.add_argument('--model', '-m', required=True, help='timm name, hf-hub:org/name or a local model directory')
    p.add_argument('--checkpoint', help='safetensors weights to load on top of the model')
    p.add_argument('--top-k', type=int, default=5, help='classes to show per image (default 5)')
    p.add_argument('--json', action='store_true', help='print JSON instead of a table')
    p.add_argument('--no-pretrained', action='store_true', help='random weights for a timm name (for testing)')
    _add_allow_pickle(p)
    p.set_defaults(fn=_cmd_predict)

    p = sub.add_parser('train', help='train a teacher, or a noised student with --pseudo')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    _add_data_args(p)
    p.add_argument('--eval-data', help='labeled dataset to evaluate on after each epoch')
    p.add_argument('--eval-split', help='default: train for a local folder, test for a Hub dataset')
    p.add_argument('--model', '-m', default='tf_efficientnet_b0', help='timm name, hf-hub:org/name or directory')
    p.add_argument('--output', '-o', required=True, help='output directory (model/, metrics.json, checkpoints/)')
    p.add_argument('--pseudo', help='pseudo-label directory from `noisystudent label`: train a student')
    p.add_argument('--unlabeled-data', help='the unlabeled dataset the pseudo labels point at (default: from stats.json)')
    p.add_argument('--unlabeled-split', default='train', help='split of --unlabeled-data (default: train)')
    p.add_argument('--pretrained', action='store_true', help='start from the timm pretrained weights (new head)')
    p.add_argument('--init-from', metavar='MODEL_DIR',
                   help="start from this model directory's weights (same architecture), e.g. the teacher's")
    p.add_argument('--image-size', type=int, help='square input size (default: the model\'s own)')
    p.add_argument('--epochs', type=int, help=f"passes over the data (default: the preset's: "
                   f"{PRESET_EPOCHS['small-data']} from random weights, {PRESET_EPOCHS['finetune']} for a pretrained "
                   f"teacher and {PRESET_STUDENT_EPOCHS['finetune']} for a pretrained student; and at least "
                   '--min-steps steps; see docs/how-it-works.md, "What epochs mean")')
    p.add_argument('--batch-size', type=int,
                   help=f'labeled images per step and per process (default {TrainConfig.batch_size})')
    p.add_argument('--lr', type=float, help=f"peak learning rate (default: the preset's; finetune "
                   f"{PRESETS['finetune']['lr']:g}; small-data: from the model's width, 3e-3 for tf_efficientnet_b0, "
                   'at most 6e-3)')
    p.add_argument('--preset', choices=PRESET_CHOICES,
                   help='optimizer recipe and budget: auto (default: finetune with --pretrained, which with '
                        '--init-from says the weights descend from pretrained ones; else small-data), '
                        'small-data (AdamW, cosine, lr from the width), finetune (AdamW, cosine, '
                        f"lr {PRESETS['finetune']['lr']:g}) or paper (RMSProp-TF, step decay)")
    p.add_argument('--ema-decay', type=float, help='EMA of the weights (default: from the run length)')
    p.add_argument('--clip-grad', type=float,
                   help="largest global gradient norm a step takes (default: the preset's, 1.0 for small-data and "
                        "finetune; 0: none)")
    p.add_argument('--randaugment', help="student input noise: 'none', 'rand-m9-n2-mstd0.5' or 'tf-m15-n2'")
    p.add_argument('--dropout', type=float, help='dropout before the classifier (default: the recipe, else 0.2)')
    p.add_argument('--drop-path', type=float, help='stochastic depth (default: a student\'s recipe, else 0.2; a teacher 0)')
    p.add_argument('--unlabeled-ratio', type=int, help='pseudo-labeled images per labeled image in a batch')
    p.add_argument('--mixed-precision', choices=MIXED_PRECISION_CHOICES,
                   help='auto: bf16 (or fp16) on a GPU, fp32 on CPU (default auto)')
    p.add_argument('--grad-accum-steps', type=int,
                   help=f'batches per optimizer step (default {TrainConfig.grad_accum_steps})')
    p.add_argument('--compile', action='store_true', help='torch.compile the model')
    p.add_argument('--num-workers', type=int,
                   help='DataLoader workers (default: on CPU measured when the stage starts, from the time of '
                        'decoding a few rows and of one model step; on a GPU half the cores, at most 8)')
    p.add_argument('--checkpoint-every', type=int, help='also checkpoint every N steps')
    p.add_argument('--min-steps', type=int, help=f'train at least N batches of --batch-size images, repeating short '
                   f"epochs (a student step counts 1 + ratio; default: the preset's, {PRESET_MIN_STEPS['small-data']} "
                   f"from random weights, {PRESET_MIN_STEPS['finetune']} from pretrained ones; 0: off)")
    p.add_argument('--max-steps', type=int, help='stop after N steps (smoke tests)')
    p.add_argument('--log-with', help='Accelerate tracker: tensorboard, wandb, ...')
    p.add_argument('--freeze-blocks', type=int, default=0, help='freeze the stem and the first N blocks')
    p.add_argument('--seed', type=int, default=0, help='seed of the data order and the noise (default 0)')
    p.add_argument('--resume', action='store_true', help='continue from the last checkpoint in --output')
    p.add_argument('--config', help='YAML with train: and noise: sections (flags override it)')
    _add_allow_pickle(p)
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser('label', help='pseudo-label an unlabeled set with a teacher, then select by confidence and class')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    p.add_argument('--teacher', '-m', required=True, help='timm name, hf-hub:org/name or a local model directory')
    p.add_argument('--data', required=True, help='unlabeled dataset: Hub id, image folder, parquet dir or save_to_disk dir')
    p.add_argument('--split', default='train', help='split, slicing allowed: train[:10%%]')
    p.add_argument('--image-column', help='image column (default: detected)')
    p.add_argument('--streaming', action='store_true', help='stream the dataset instead of downloading it whole')
    p.add_argument('--output', '-o', required=True, help='output directory (data/*.parquet, stats.json, confidence.png)')
    p.add_argument('--hard', action='store_true', help='hard (one-hot argmax) labels instead of soft ones')
    p.add_argument('--temperature', type=float,
                   help=f'soft labels are softmax(logits / T) (default {LabelsConfig.temperature:g})')
    p.add_argument('--threshold', type=float,
                   help=f'keep images whose top-1 probability is >= this (default {LabelsConfig.threshold:g})')
    p.add_argument('--per-class', type=_per_class_arg, metavar='auto|none|N',
                   help=f'balance every class to N images (default {LabelsConfig.per_class}): auto is the median '
                        'count above the threshold, and at least half an even share of the images labeled '
                        '(images / (2 x classes)); none: no balancing')
    p.add_argument('--topk', type=int, help=f'store the top-k probabilities instead of all (default: '
                                            f'{DEFAULT_TOPK} above {FULL_PROBS_MAX_CLASSES} classes)')
    p.add_argument('--batch-size', type=int, help=f'images per forward pass (default {LabelsConfig.batch_size})')
    p.add_argument('--image-size', type=int, help="the teacher's input size (default: its own data config)")
    p.add_argument('--mixed-precision', choices=MIXED_PRECISION_CHOICES,
                   help='auto: bf16 on a GPU or a CPU with fast bf16, else fp32 (default auto)')
    p.add_argument('--seed', type=int, default=0, help='seed of the duplication draw when balancing')
    p.add_argument('--num-workers', type=int,
                   help='DataLoader workers (default: on CPU measured at start-up, a stream by its image size; '
                        'on a GPU half the cores, at most 8)')
    p.add_argument('--rows-per-shard', type=int, help='rows per output shard, the unit of resume')
    _add_allow_pickle(p)
    p.set_defaults(fn=_cmd_label)

    p = sub.add_parser('export', help='write a model directory for the Hub: model.safetensors, config.json, README.md')
    p.add_argument('src', metavar='SRC', help='model directory, run stage directory, or run directory (its final student)')
    p.add_argument('out', metavar='OUT', help='directory to write (replaced whole if it holds an earlier export)')
    p.add_argument('--repo-id', help='ORG/NAME the card\'s usage snippet loads (default: a placeholder that push fills in)')
    p.add_argument('--license', help="license in the card metadata (default: the model's own, else apache-2.0)")
    _add_allow_pickle(p)
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser('push', help='export a model and upload it to a Hub model repo as one commit')
    p.add_argument('src', metavar='SRC', help='model directory, run stage directory, or run directory (its final student)')
    _add_push_args(p)
    p.set_defaults(fn=_cmd_push)

    p = sub.add_parser('push-labels', help='upload a pseudo-label directory to a Hub dataset repo as one commit')
    p.add_argument('labels_dir', metavar='LABELS_DIR', help='directory written by `noisystudent label`')
    _add_push_args(p)
    p.set_defaults(fn=_cmd_push_labels)

    p = sub.add_parser('run', help='the whole Noisy Student loop from a YAML config')
    p.add_argument('config', metavar='CONFIG.yaml', help='the run config (every key: docs/config.md)')
    p.add_argument('overrides', nargs='*', metavar='KEY=VALUE', help='override config keys: teacher.epochs=5')
    p.add_argument('--output', '-o', help='run directory (default: the config\'s output)')
    p.add_argument('--restart-from', metavar='STAGE', help='redo this stage and every later one (e.g. iter1-labels)')
    p.add_argument('--print-config', action='store_true', help='print the resolved config and exit')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser('demo', help='the embedded default: Noisy Student on scikit-learn digits, no download')
    p.add_argument('--output', '-o', default='runs/demo', help='everything is written under this directory')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser('bench', help='labeling and student training speed against plain timm loops, side by side')
    p.add_argument('--n', type=int, default=2048, help='JPEGs to generate and label (default 2048)')
    p.add_argument('--model', '-m', default='tf_efficientnet_b0', help='timm name (random weights) or model directory')
    p.add_argument('--batch-size', type=int, default=32, help='images per step (default 32)')
    p.add_argument('--image-size', type=int, help="square input size (default: the model's own)")
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='where to run (default cpu)')
    p.add_argument('--num-workers', type=int, help='DataLoader workers for every loop (default: the project default)')
    p.add_argument('--train-steps', type=int, default=4, help='timed training steps per loop (default 4)')
    p.add_argument('--workdir', help='keep the generated images here (and reuse them); default: a temp dir')
    p.add_argument('--seed', type=int, default=0, help='seed of the generated images (default 0)')
    p.add_argument('--json', metavar='PATH', help='also write the results as JSON')
    p.add_argument('--scale', type=int, nargs='+', metavar='N',
                   help='instead: index, open, labeling set-up, selection and first-step figures at N images '
                        '(a folder of hard links), e.g. --scale 10000 100000 1000000')
    p.add_argument('--selection-only', action='store_true',
                   help='with --scale: only selection over N synthetic rows (e.g. 10000000)')
    p.set_defaults(fn=_cmd_bench)

    p = sub.add_parser('eval', help='top-1 and top-5 of a model on a labeled split')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    p.add_argument('--model', '-m', required=True, help='timm name, hf-hub:org/name or a local model directory')
    _add_data_args(p)
    p.set_defaults(split=None)
    p.add_argument('--batch-size', type=int, default=64, help='images per forward pass (default 64)')
    p.add_argument('--image-size', type=int, help="square input size (default: the model's own)")
    p.add_argument('--mixed-precision', choices=MIXED_PRECISION_CHOICES, default='auto',
                   help='auto: bf16 on a GPU or a CPU with fast bf16, else fp32 (default auto)')
    p.add_argument('--num-workers', type=int,
                   help='DataLoader workers (default: half the cores at 64 px and below, an eighth above, at most 8; '
                        'on a GPU half the cores, at most 8)')
    p.add_argument('--json', action='store_true', help='print the metrics as JSON')
    _add_allow_pickle(p)
    p.set_defaults(fn=_cmd_eval)
    return parser


_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
_IN_THE_WAY = {errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


def _os_error(e: OSError) -> str:
    """A failed read or write as one line that says what to do; atomic writers left no partial file."""
    from .files import DiskFull, full_disk_errno, shown_path

    # a copy or rename names its destination second: that is where the space was missing
    target, full = e.filename2 or e.filename, full_disk_errno(e)
    if full and target:
        return str(DiskFull(os.fsdecode(target), full))
    # a writer's hidden temporary (.NAME.tmp-XXXX) is named as the path the user gave: NAME
    shown = shown_path(os.fsdecode(e.filename)) if e.filename else ''
    what = str(e.strerror or e).strip().splitlines()[0] + (f': {shown}' if shown else '')
    if full:
        hint = 'free some disk space, then run the same command again; finished work is kept'
    elif e.errno == errno.EFBIG:
        hint = ("a file outgrew the size limit (`ulimit -f`, or the filesystem's largest file); raise it or "
                'write elsewhere, then run the same command again; finished work is kept')
    elif e.errno in _NOT_WRITABLE:
        hint = 'that location is not writable; fix its permissions or choose another output directory'
    elif e.errno in _IN_THE_WAY:
        hint = 'a file stands where a directory should be (or the reverse); choose another path'
    else:
        hint = 'check the path and the disk, then run the same command again'
    return f'{what}; {hint}.'


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    # the project's own warnings are advice to the user: one line, without the source location
    if issubclass(category, UserWarning) and f'{os.sep}timm_noisystudent{os.sep}' in str(filename):
        print(f'warning: {message}', file=file or sys.stderr, flush=True)
    else:
        _default(message, category, filename, lineno, file, line)


def _print_error(line: str) -> None:
    # under `accelerate launch` every process meets the same error; one of them says it
    if os.environ.get('RANK', '0') == '0':
        print(line, file=sys.stderr, flush=True)


# every option and argument that names a file or directory (a timm name or Hub id never starts with '~')
_PATH_ARGS = ('data', 'eval_data', 'unlabeled_data', 'output', 'pseudo', 'init_from', 'checkpoint', 'config',
              'images', 'src', 'out', 'labels_dir', 'workdir', 'json', 'model', 'teacher')


def _expand_user(args) -> None:
    """``~`` and ``~user`` at the start of a path mean the home folder for every command, also when a
    shell passed them on quoted: expanded once here, so no later step sees the literal ``~``."""
    for name in _PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) else v for v in value])


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _expand_user(args)
    warnings.showwarning = _show_warning
    try:
        return _run(args)
    finally:
        from .runtime import end_processes
        end_processes()


def _run(args) -> int:
    try:
        args.fn(args)
    except UserError as e:
        if args.debug:
            raise
        _print_error(f'error: {e}')
        return 2
    except OSError as e:  # a full disk, a read-only or missing directory: the user's to fix
        if args.debug:
            raise
        _print_error(f'error: {_os_error(e)}')
        return 2
    except Exception as e:
        from .runtime import Preempted, lost_peer_error, lost_processes
        if isinstance(e, Preempted):
            # a launcher stops the others with SIGTERM when one process dies: say so rather than 'stopped'
            lost = lost_processes()
            if lost:
                _lost_processes_exit(lost)
            if os.environ.get('RANK', '0') == '0':
                print(str(e), file=sys.stderr, flush=True)
            return 128 + e.signal  # what a shell reports for a process ended by that signal
        if lost_peer_error(e) and not args.debug:
            lost = lost_processes()
            if lost != []:  # [] : every process is still here, so the collective failed for another reason
                _lost_processes_exit(lost)
        raise
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr, flush=True)
        return 130
    return 0


def _lost_processes_exit(lost) -> None:
    """One line for a process of the launch that is gone, then exit at once.

    The process group still waits on the lost process: tearing it down, or the interpreter's
    exit doing so, can block on it or abort ('terminate called without an active exception').
    Everything this process wrote was closed when the error unwound the stage.
    """
    from .runtime import lost_processes_line
    line = lost_processes_line(lost)
    if line:
        print(line, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)


if __name__ == '__main__':
    sys.exit(main())
