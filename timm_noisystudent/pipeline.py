"""The Noisy Student loop: teacher, then (labels, student) per iteration, then an optional fine-tune.

Each stage writes its own directory under the run directory and is done only once its
``DONE`` marker exists (written last, atomically). A rerun skips done stages and resumes the
unfinished one. Each stage records a hash of the config it depends on, chained through the
stages before it, so a changed setting cannot silently mix with stale results.
"""
import json
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .config import (ModelStage, RunConfig, UserError, clip_grad_of, config_from_dict, config_hash, config_to_dict,
                     stage_epochs, stage_pretrained)
from .files import output_lock, save_config, save_figure, text_table, write_json_atomic, write_text_atomic
from .data import check_output_outside, load_source, pseudo_batch_size, sources_of_run
from .engine import check_trackers, duration, resolve_stage, schedule, seconds_per_step, train
from .rundir import (
    check_run_output, check_stages, is_done, mark_done, read_json, remove_leftovers, stage_kind, stage_names,
    start_stage,
)
from .runtime import Preempted, process_state
from .labeling import label
from .models import architecture_of, check_model_name, count_params

__all__ = ['run', 'stage_names', 'format_summary', 'students_beat_teachers']


def _stage_hashes(cfg: RunConfig) -> Dict[str, str]:
    """Each stage's config hash, chained: a change upstream invalidates everything after it."""
    # settings that change speed or logging, never results, stay out of the hash
    train = {k: v for k, v in config_to_dict(cfg.train).items()
             if k not in ('num_workers', 'checkpoint_every', 'keep_checkpoints', 'log_with')}
    # the bound a stage trains with; none stays out, as before the key existed, so such runs keep their hashes
    train['clip_grad'] = clip_grad_of(cfg.train)
    if train['clip_grad'] is None:
        train.pop('clip_grad')
    common = {'labeled': config_to_dict(cfg.labeled), 'eval': config_to_dict(cfg.eval) if cfg.eval else None,
              'train': train, 'seed': cfg.seed}
    epochs = stage_epochs(cfg)
    hashes = {'iter0-teacher': config_hash({**common, 'teacher': config_to_dict(cfg.teacher)})}
    prev = hashes['iter0-teacher']
    for k, student in enumerate(cfg.students, start=1):
        hashes[f'iter{k}-labels'] = prev = config_hash(
            {'prev': prev, 'unlabeled': config_to_dict(cfg.unlabeled), 'labels': config_to_dict(cfg.labels),
             'seed': cfg.seed, 'iterate_from': cfg.iterate_from,
             'validation': config_to_dict(cfg.validation) if cfg.validation else None})
        hashes[f'iter{k}-student'] = prev = config_hash(
            {**common, 'prev': prev, 'student': config_to_dict(student), 'epochs': epochs[k],
             'noise': config_to_dict(cfg.noise), 'unlabeled': config_to_dict(cfg.unlabeled)})
    if cfg.finetune.epochs > 0:
        hashes['finetune'] = config_hash({**common, 'prev': prev, 'finetune': config_to_dict(cfg.finetune)})
    return hashes


def _check_before_training(cfg: RunConfig) -> None:
    """What config.py cannot check on its own, checked before the teacher spends hours training."""
    from .augment import NoiseSpecError, parse_noise_spec

    specs = [('noise.randaugment', cfg.noise.randaugment)]
    specs += [(f'students.{i}.randaugment', s.randaugment) for i, s in enumerate(cfg.students)]
    for key, spec in specs:
        try:
            parse_noise_spec(spec)
        except NoiseSpecError as e:
            raise UserError(f'{key}: {e}') from None
    check_trackers(cfg.train.log_with, 'train.log_with')
    for what in ('labeled', 'unlabeled', 'eval', 'validation'):
        check_output_outside(cfg.output, getattr(cfg, what), what)
    stages = [('teacher.model', cfg.teacher.model)] + [(f'students.{i}.model', s.model)
                                                       for i, s in enumerate(cfg.students)]
    for key, model in stages:
        try:
            check_model_name(model)
        except UserError as e:
            raise UserError(f'{key}: {e}') from None
    if cfg.hub.repo_id:
        from huggingface_hub import get_token

        from .hub import check_repo_id
        try:
            check_repo_id(cfg.hub.repo_id)
        except UserError as e:
            raise UserError(f'hub.repo_id: {e}') from None
        if not get_token():
            raise UserError('hub.repo_id is set but there is no Hugging Face token; set HF_TOKEN or run '
                            '`hf auth login`, or remove hub.repo_id.')


def _preempted(name: str, e: Preempted) -> Preempted:
    return Preempted(f'{name}: {e} Run the same command again to resume; finished stages are skipped.', e.signal)


def _train_row(name: str, metrics: Dict[str, Any], model: str, teacher: Optional[str]) -> Dict[str, Any]:
    return {'stage': name, 'model': model, 'teacher': teacher, 'top1': metrics.get('top1'),
            'top5': metrics.get('top5'), 'val_top1': None,
            'labeled_images': metrics.get('labeled_images'), 'pseudo_images': metrics.get('pseudo_images', 0),
            'steps': metrics.get('step'), 'seconds': metrics.get('seconds')}


def _labels_row(name: str, stats: Dict[str, Any], teacher: str, teacher_stage: str) -> Dict[str, Any]:
    return {'stage': name, 'model': teacher, 'teacher': teacher_stage, 'top1': None, 'top5': None, 'val_top1': None,
            'labeled_images': None, 'pseudo_images': stats.get('rows_after'), 'steps': None,
            'seconds': stats.get('seconds'),
            'selection': {k: stats.get(k) for k in ('rows_labeled', 'rows_before', 'rows_after', 'per_class_target',
                                                    'rows_below_threshold', 'filled_classes', 'empty_classes',
                                                    'duplicated')}}


def _score(row: Dict[str, Any]) -> Optional[float]:
    """What chooses between models: top-1 on the validation split if there is one, else on eval."""
    return row['val_top1'] if row.get('val_top1') is not None else row.get('top1')


def _previous_size(cfg: RunConfig, k: int) -> Optional[int]:
    for stage in reversed([cfg.teacher] + cfg.students[:k - 1]):
        if stage.image_size is not None:
            return stage.image_size
    return None


def _warn_small_student(teacher: str, student: str) -> Optional[str]:
    try:
        if count_params(student) < count_params(teacher):
            return (f'student {student} is smaller than its teacher {teacher}; the paper uses equal or '
                    'larger students.')
    except Exception:  # hf-hub: or directory specs are not counted without loading them
        return None
    return None


def run(
        config: Union[RunConfig, Dict[str, Any]],
        output: Optional[Union[str, os.PathLike]] = None,
        restart_from: Optional[str] = None,
        progress: bool = True,
        echo: bool = True,
) -> Dict[str, Any]:
    """Run the whole Noisy Student loop and return the summary (``{"stages": [...], ...}``)."""
    cfg = config if isinstance(config, RunConfig) else config_from_dict(config)
    if output is not None:
        cfg = replace(cfg, output=str(output))
    out = Path(cfg.output).expanduser()
    _check_before_training(cfg)
    check_run_output(out)
    state = process_state()
    sources = {'labeled': cfg.labeled, 'unlabeled': cfg.unlabeled, 'eval': cfg.eval, 'validation': cfg.validation}
    with output_lock(out, state), _datasets_bars(progress):  # one run per directory; a second one stops here
        with sources_of_run(out / 'sources', sources, state):  # each source resolved once, for every stage
            return _run(cfg, out, state, restart_from, progress, echo)


@contextmanager
def _datasets_bars(progress: bool):
    """With ``progress=False``, datasets' own bars (and the source index's, which follows them) stay off."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was and not progress:
            datasets.enable_progress_bars()


def _run(cfg: RunConfig, out: Path, state, restart_from: Optional[str], progress: bool,
         echo: bool) -> Dict[str, Any]:
    names = stage_names(cfg)
    hashes = _stage_hashes(cfg)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out)
    state.wait_for_everyone()
    check_stages(out, names, hashes, restart_from)
    if state.is_main_process:
        save_config(cfg, out / 'config.yaml')

    def say(text: str) -> None:
        if echo and state.is_main_process:
            print(text, flush=True)

    epochs = stage_epochs(cfg)
    pretrained = stage_pretrained(cfg)
    if state.is_main_process and echo:
        for line in plan_lines(cfg, [n for n in names if not is_done(out / n)]):
            print(line, flush=True)
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    flags: List[str] = []
    earlier = run_notes(out)  # a finished stage is skipped on a rerun; its notes stay in the summary

    def keep_notes(name: str) -> None:
        notes.extend(n for n in earlier if n.startswith(f'{name}: ') and n not in notes)

    def stage(stage_dir: Path, name: str, model: str, teacher: Optional[str], fn) -> Dict[str, Any]:
        if is_done(stage_dir):
            keep_notes(name)
        with _noted(name, notes, say):
            row = _run_train_stage(stage_dir, hashes[name], say, name, model, teacher, fn)
        val = _validation(stage_dir, cfg) if cfg.validation is not None else None
        row['val_top1'] = val.get('top1') if val else None
        rows.append(row)
        return row

    teacher_stage = replace(cfg.teacher, epochs=epochs[0], pretrained=pretrained[0])
    best = last = stage(
        out / 'iter0-teacher', 'iter0-teacher', cfg.teacher.model, None,
        lambda d: train(teacher_stage, cfg.labeled, d, eval_data=cfg.eval, train_cfg=cfg.train, noise=cfg.noise,
                        seed=cfg.seed, resume=True, progress=progress))
    if _score(best) is None and cfg.iterate_from == 'best' and cfg.students:
        notes.append('no eval or validation split: each student labels the next iteration (iterate_from: last), '
                     'since nothing measures which model is best.')
        say(f'warning: {notes[-1]}')

    for k, student in enumerate(cfg.students, start=1):
        source = best if cfg.iterate_from == 'best' else last
        teacher_model, teacher_name = out / source['stage'] / 'model', source['model']
        labels_dir = out / f'iter{k}-labels'
        name = f'iter{k}-labels'
        if is_done(labels_dir):
            stats = json.loads((labels_dir / 'stats.json').read_text())
            say(f'{name}: done, skipped')
            keep_notes(name)
        else:
            say(f"{name}: labeling {cfg.unlabeled.path} with {source['stage']} ({teacher_name})")
            start_stage(labels_dir, hashes[name])
            with _noted(name, notes, say):
                try:
                    stats = label(str(teacher_model), cfg.unlabeled, labels_dir, cfg.labels, seed=cfg.seed + k,
                                  num_workers=cfg.train.num_workers, progress=progress)
                except Preempted as e:
                    raise _preempted(name, e) from None
            if state.is_main_process:
                mark_done(labels_dir, {'stage': name, 'rows': stats.get('rows_after'), 'teacher': source['stage']})
            state.wait_for_everyone()
            say(f"{name}: kept {stats.get('rows_after')} pseudo-labeled rows of {stats.get('rows_labeled')} images "
                f"labeled, in {_number(stats.get('seconds'), 1)} s")
        rows.append(_labels_row(name, stats, teacher_name, source['stage']))
        few = _few_unlabeled(stats, rows[0]) if k == 1 else None
        if few:
            notes.append(f'{name}: {few}')
            say(f'warning: {few}')

        # a student without its own image_size trains at the resolution the run chose before it
        size = student.image_size if student.image_size is not None else _previous_size(cfg, k)
        # a student starts from pretrained weights, its own or its teacher's, when the run's do (stage_pretrained)
        student_stage = replace(student, epochs=epochs[k], image_size=size, pretrained=pretrained[k])
        name = f'iter{k}-student'
        small = _warn_small_student(teacher_name, student.model)
        if small and not is_done(out / name):
            notes.append(f'{name}: {small}')
            say(f'warning: {small}')
        same = architecture_of(student.model) is not None and \
            architecture_of(student.model) == architecture_of(teacher_model)
        init = teacher_model if cfg.train.student_init == 'teacher' and same else None
        last = stage(
            out / name, name, student.model, source['stage'],
            lambda d, s=student_stage, p=labels_dir, i=init: train(
                s, cfg.labeled, d, eval_data=cfg.eval, pseudo=p, unlabeled=cfg.unlabeled, train_cfg=cfg.train,
                noise=cfg.noise, seed=cfg.seed + k, resume=True, progress=progress, init_from=i))
        below = _below(last, source)
        last['below_teacher'] = below
        if below:
            then = (f"the next labels come from {best['stage']} (iterate_from: best)"
                    if cfg.iterate_from == 'best' else 'it labels the next iteration anyway (iterate_from: last)')
            flags.append(f"{name} ({student.model}) reached {_scored(last)}, below its teacher {source['stage']}'s "
                         f"{_scored(source)}; {then}. Try less noise, more epochs or a stronger teacher.")
            say(f'WARNING: {flags[-1]}')
        if _score(last) is not None and _score(best) is not None and _score(last) > _score(best):
            best = last

    chosen = best if cfg.iterate_from == 'best' and _score(best) is not None else last
    final_stage = chosen['stage']
    if cfg.finetune.epochs > 0:
        ft = ModelStage(model=str(out / final_stage / 'model'), epochs=cfg.finetune.epochs,
                        image_size=cfg.finetune.image_size,
                        lr=cfg.finetune.lr if cfg.finetune.lr is not None else 1e-4)
        stage(out / 'finetune', 'finetune', chosen['model'], final_stage,
              lambda d: train(ft, cfg.labeled, d, eval_data=cfg.eval, train_cfg=replace(cfg.train, ema_decay=0.0, min_steps=0),
                              seed=cfg.seed, resume=True, progress=progress,
                              freeze_blocks=cfg.finetune.freeze_blocks, unaugmented=True))
        final_stage = 'finetune'

    summary = {'stages': rows, 'flags': flags, 'notes': notes, 'final_stage': final_stage,
               'iterate_from': cfg.iterate_from, 'selected_by': _selected_by(cfg)}
    if final_stage != rows[-1]['stage']:
        notes.append(f"final/ is {final_stage} (top-1 {_number(chosen['top1'])}), the best model of the run by "
                     f"{summary['selected_by']} top-1; the last student is {rows[-1]['stage']}.")
    if state.is_main_process:
        write_json_atomic(out / 'summary.json', summary)
        write_text_atomic(out / 'summary.md', format_summary(summary, markdown=True))
        plot_accuracy(summary, out / 'accuracy.png')
        _export_final(out / final_stage, out)  # after the summary: the model card reads its lineage
    state.wait_for_everyone()
    say('')
    say(format_summary(summary))
    for line in summary['flags']:
        say(f'WARNING: {line}')
    for line in notes[-1:] if final_stage != rows[-1]['stage'] else []:
        say(line)
    say(f'final model: {out / "final"} ({final_stage})')
    if cfg.hub.repo_id:
        from .hub import push
        if state.is_main_process:
            url = push(out / 'final', cfg.hub.repo_id, private=cfg.hub.private)
            say(f'pushed: {url}')
    else:
        say(f"load it: timm.create_model('local-dir:{out / 'final'}', pretrained=True)")
        say(f'push it: noisystudent push {out} --repo-id ORG/NAME')
    return summary


def _rows(source) -> Optional[int]:
    try:
        return len(load_source(source))
    except TypeError:  # a stream has no length
        return None


def _steps_per_epoch(rows: int, batch: int) -> int:
    return rows // batch if rows > batch else 1  # the loaders drop a last partial batch


def plan(cfg: RunConfig, todo: List[str]) -> List[Dict[str, Any]]:
    """Each stage still to run: its steps and an estimate of its seconds from a measured step time.

    A student's pseudo-labeled rows are not known before its labels exist: the unlabeled set's size
    stands in for them.
    """
    from .runtime import resolve_precision

    labeled, unlabeled = _rows(cfg.labeled), _rows(cfg.unlabeled)
    evals = _rows(cfg.eval) if cfg.eval is not None else 0
    precision = resolve_precision(cfg.train.mixed_precision, 'train')
    epochs, pretrained = stage_epochs(cfg), stage_pretrained(cfg)
    out, size, last_per_image = [], cfg.teacher.image_size, None
    for k, stage in enumerate([cfg.teacher] + list(cfg.students)):
        size = stage.image_size if stage.image_size is not None else size
        spec = resolve_stage(replace(stage, epochs=epochs[k], image_size=size, pretrained=pretrained[k]),
                             cfg.train, cfg.noise, student=k > 0)
        name = f'iter{k}-student' if k else 'iter0-teacher'
        per_step = per_image = None
        if k == 0:
            images, spe = spec.batch_size, _steps_per_epoch(labeled, spec.batch_size)
        else:
            pseudo = unlabeled or labeled
            pb = pseudo_batch_size(spec.batch_size, spec.unlabeled_ratio, pseudo, labeled)
            images = spec.batch_size + pb
            spe = max(_steps_per_epoch(pseudo, pb), math.ceil(labeled / spec.batch_size))
        if name in todo or f'iter{k + 1}-labels' in todo:  # this stage trains, or its model labels the next
            per_step = seconds_per_step(spec.model, spec.image_size, images, precision, cfg.train.channels_last)
            per_image = per_step / images / 3 if per_step is not None else None  # a forward is about a third
        if k and f'iter{k}-labels' in todo:
            labels_s = unlabeled * last_per_image if unlabeled and last_per_image is not None else None
            out.append({'stage': f'iter{k}-labels', 'images': unlabeled, 'seconds': labels_s})
        if name in todo:
            stage_epochs_, steps = schedule(spe, spec, cfg.train, images)
            seconds = None
            if per_step is not None:
                n_evals = min(stage_epochs_, 10) + 1
                seconds = steps * per_step + n_evals * (evals or 0) * per_image
            out.append({'stage': name, 'model': spec.model, 'preset': spec.preset, 'lr': spec.lr, 'steps': steps,
                        'images_per_step': images, 'image_size': spec.image_size, 'seconds': seconds,
                        'seconds_per_step': per_step, 'estimated_rows': k > 0})
        last_per_image = per_image
    return out


def plan_lines(cfg: RunConfig, todo: List[str]) -> List[str]:
    """The plan as the lines a run prints before it starts."""
    stages = plan(cfg, todo)
    if not stages:
        return []
    lines = ['plan (compute time measured on this machine with random weights; data loading adds to it):']
    for s in stages:
        if 'model' not in s:
            lines.append(f"  {s['stage']}: label {s['images'] if s['images'] is not None else 'a stream of'} images, "
                         f"{_about(s['seconds'])}")
            continue
        lr = f", lr {s['lr']:g}" if s['lr'] is not None else ''
        rows = ' (pseudo-labeled rows taken as the unlabeled set\'s size)' if s['estimated_rows'] else ''
        lines.append(f"  {s['stage']}: {_short(s['model'])} at {s['image_size'] or 'its own size'} px, preset "
                     f"{s['preset']}{lr}: {s['steps']} steps of {s['images_per_step']} images{rows}, "
                     f"{_about(s['seconds'])}")
    known = [s['seconds'] for s in stages]
    total = sum(known) if all(t is not None for t in known) else None
    lines.append(f'  total: {_about(total)}' + ('' if total is not None else ' (a model is not known here)'))
    return lines


def _short(model: str) -> str:
    """A model as the plan names it: a directory by its name, anything else as given."""
    return Path(model[len('local-dir:'):]).name if model.startswith('local-dir:') else model


def _about(seconds: Optional[float]) -> str:
    return f'about {duration(seconds)}' if seconds is not None else 'duration unknown'


def run_notes(out: Path) -> List[str]:
    """The notes of the summary a run directory holds from an earlier run of it."""
    summary = read_json(out / 'summary.json')
    notes = summary.get('notes') if isinstance(summary, dict) else None
    return [n for n in notes if isinstance(n, str)] if isinstance(notes, list) else []


@contextmanager
def _noted(name: str, notes: List[str], say):
    """Warnings raised inside a stage go into the summary's notes and are printed once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        yield
    for w in caught:
        # the same warning from several stages (a small image size) is noted and said once a run
        if issubclass(w.category, UserWarning) and not any(n.endswith(f': {w.message}') for n in notes):
            notes.append(f'{name}: {w.message}')
            say(f'warning: {w.message}')


def students_beat_teachers(summary: Dict[str, Any]) -> bool:
    """Whether every student of a run ended strictly above the model that labeled its data."""
    by_stage = {r['stage']: r for r in summary['stages']}
    students = [r for r in summary['stages'] if stage_kind(r['stage']) == 'student']
    return all(_score(r) is not None and r['teacher'] in by_stage and _score(by_stage[r['teacher']]) is not None
               and _score(r) > _score(by_stage[r['teacher']]) for r in students)


def _few_unlabeled(stats: Dict[str, Any], teacher_row: Dict[str, Any]) -> Optional[str]:
    """A warning when the unlabeled set is smaller than the labeled one; None when it is not.

    Measured on CIFAR-10 with 4,000 labels and 3,000 unlabeled images (docs/how-it-works.md, "When
    the unlabeled images are few"): the loop's students gained what the same warm restarts without any unlabeled
    data gained, and ended below one supervised schedule of the loop's length.
    """
    unlabeled, labeled = stats.get('rows_labeled'), teacher_row.get('labeled_images')
    if not unlabeled or not labeled or unlabeled >= labeled:
        return None
    return (f'the unlabeled set has {unlabeled:,} images, fewer than the {labeled:,} labeled ones: with so few, '
            'a student gains about what more supervised training would (docs/how-it-works.md, "When the unlabeled '
            'images are few"); add unlabeled images if you can.')


def _selected_by(cfg: RunConfig) -> Optional[str]:
    return 'validation' if cfg.validation is not None else 'eval' if cfg.eval is not None else None


def _below(row: Dict[str, Any], teacher: Dict[str, Any]) -> bool:
    a, b = _score(row), _score(teacher)
    return a is not None and b is not None and a < b


def _scored(row: Dict[str, Any]) -> str:
    if row.get('val_top1') is not None:
        return f"validation top-1 {row['val_top1']:.2f}"
    return f"top-1 {row['top1']:.2f}"


def _validation(stage_dir: Path, cfg: RunConfig) -> Dict[str, Any]:
    """The stage's model on the validation split, measured once and kept in validation.json."""
    from .engine import evaluate_model

    path = stage_dir / 'validation.json'
    if path.is_file():
        return json.loads(path.read_text())
    metrics = evaluate_model(str(stage_dir / 'model'), cfg.validation,
                             batch_size=cfg.train.eval_batch_size or 2 * cfg.train.batch_size,
                             num_workers=cfg.train.num_workers)
    if process_state().is_main_process:
        write_json_atomic(path, metrics)
    process_state().wait_for_everyone()
    return metrics


def _run_train_stage(stage_dir: Path, hash_: str, say, name: str, model: str, teacher: Optional[str], fn):
    if is_done(stage_dir):
        say(f'{name}: done, skipped')
        metrics = json.loads((stage_dir / 'metrics.json').read_text())
    else:
        say(f'{name}: training {model}' + (f' on labels from {teacher}' if teacher else ''))
        start_stage(stage_dir, hash_)
        try:
            metrics = fn(stage_dir)
        except Preempted as e:
            raise _preempted(name, e) from None
        if process_state().is_main_process:
            mark_done(stage_dir, {'stage': name, 'top1': metrics.get('top1')})
        process_state().wait_for_everyone()
        say(f"{name}: top-1 {_number(metrics.get('top1'))}, {metrics.get('step')} steps in "
            f"{_number(metrics.get('seconds'), 1)} s")
    return _train_row(name, metrics, model, teacher)


def _number(v, digits=2) -> str:
    if v is None:
        return '-'
    return f'{v:.{digits}f}' if isinstance(v, float) else str(v)


def format_summary(summary: Dict[str, Any], markdown: bool = False) -> str:
    """The summary table, as plain text for the terminal or as Markdown. (!) marks a student below its teacher."""
    val = any(r.get('val_top1') is not None for r in summary['stages'])
    header = ['stage', 'model', 'teacher', 'top-1', 'top-5'] + (['val top-1'] if val else []) + [
        'labeled', 'pseudo', 'steps', 'seconds']
    rows = [[r['stage'] + (' (!)' if r.get('below_teacher') else '') + (' *' if r['stage'] == summary.get(
                'final_stage') else ''),
             r['model'], r['teacher'] or '-', _number(r['top1']), _number(r['top5'])]
            + ([_number(r.get('val_top1'))] if val else [])
            + [_number(r['labeled_images']), _number(r['pseudo_images']), _number(r.get('steps')), _number(r['seconds'], 1)]
            for r in summary['stages']]
    footer = ['* final/ (the model the run exports)'] if summary.get('final_stage') else []
    if markdown:
        lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
        lines += [''] + footer
        if summary.get('flags'):
            lines += [''] + [f'- (!) {f}' for f in summary['flags']]
        if summary.get('notes'):
            lines += [''] + [f'- {n}' for n in summary['notes']]
        return '\n'.join(lines) + '\n'
    return '\n'.join([text_table([header] + rows, left=3)] + footer)


def plot_accuracy(summary: Dict[str, Any], path: Path) -> None:
    """Top-1 per iteration, with the teacher as the baseline."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    points = [(r['stage'], r['top1']) for r in summary['stages'] if r['top1'] is not None]
    if not points:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = list(range(len(points)))
    ax.plot(xs, [p[1] for p in points], marker='o', label='top-1')
    ax.axhline(points[0][1], color='gray', linestyle='--', label=f'teacher {points[0][1]:.1f}%')
    ax.set_xticks(xs, [p[0].replace('-student', '').replace('-teacher', ' teacher') for p in points])
    ax.set_ylabel('top-1 (%)')
    ax.set_title('Noisy Student: top-1 per iteration')
    ax.legend()
    save_figure(fig, path, dpi=100)


def _export_final(stage_dir: Path, out: Path) -> None:
    """final/ is the chosen stage's export, with a model card."""
    from .hub import export
    export(stage_dir, out / 'final')
