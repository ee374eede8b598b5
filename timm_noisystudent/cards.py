"""Noisy Student model cards, pseudo-label dataset cards and the cards of the registered variants.

A card is built from what a run left on disk: the run's ``config.yaml`` and ``summary.json``,
the stage's ``metrics.json`` and the pseudo-label ``stats.json``. Each part is optional: a bare
model directory still gets a shorter card. Local paths appear by name only.
"""
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

from .config import UserError
from .models import NS_RECIPES, count_params
from .rundir import (
    FINETUNE, STAGE_NAME, ModelSource, is_model_stage, is_run_dir, labels_dir_of, labels_files, model_stages,
    read_json, resolve_source, run_config, run_summary,
)

__all__ = ['model_card', 'labels_card', 'variant_card', 'variant_cards', 'PLACEHOLDER_REPO_ID', 'DEFAULT_LICENSE',
           'CITATION']

# What the usage snippet names until the model has a repo; `push` replaces it.
PLACEHOLDER_REPO_ID = 'YOUR-ORG/YOUR-MODEL'


_PLACEHOLDER_NOTE = (f'`{PLACEHOLDER_REPO_ID}` stands for the repo this model is pushed to; '
                     '`noisystudent push` fills it in.')


DEFAULT_LICENSE = 'apache-2.0'


_MAX_CLASS_ROWS = 30  # above this many classes the card summarises the counts


# datasets' packaged builders: a DataSource path that names one is not a Hub dataset
_BUILDERS = {'imagefolder', 'audiofolder', 'videofolder', 'parquet', 'csv', 'json', 'text', 'arrow',
             'pandas', 'webdataset', 'sql', 'generator'}


_TAGS = ['image-classification', 'timm', 'noisy-student', 'timm-noisystudent']


_PAPER = 'https://arxiv.org/abs/1911.04252'


CITATION = """@inproceedings{xie2020selftraining,
  title     = {Self-training with Noisy Student improves ImageNet classification},
  author    = {Xie, Qizhe and Luong, Minh-Thang and Hovy, Eduard and Le, Quoc V.},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {10687--10698},
  year      = {2020}
}"""


def _section(cfg: Dict[str, Any], key: str) -> Dict[str, Any]:
    value = cfg.get(key)
    if isinstance(value, str):  # `labeled: cifar10` is short for {path: cifar10}
        return {'path': value}
    if not isinstance(value, dict):
        return {}
    value = dict(value)
    if 'config' in value and 'name' not in value:
        value['name'] = value.pop('config')
    return value


def _local_roots(run: Optional[Path]) -> List[Path]:
    roots = [Path.cwd()]
    if run is not None:
        run = run.resolve()
        roots += [run.parent, run.parent.parent]
    return roots


def _hub_dataset_id(path: Optional[str], roots: Sequence[Path] = ()) -> Optional[str]:
    """``path`` if it names a Hub dataset rather than a local one or a packaged builder."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(path, str) or not path or path.startswith(('/', '.', '~')) or '\\' in path:
        return None
    if path.lower() in _BUILDERS or any((root / path).exists() for root in roots):
        return None
    try:
        validate_repo_id(path)
    except HFValidationError:
        return None
    return path


def _shown_path(path: Optional[str], roots: Sequence[Path]) -> str:
    """A dataset or model as the card shows it: Hub ids whole, local paths by their last part only."""
    if not path:
        return '-'
    if path.startswith('hf-hub:') or _hub_dataset_id(path, roots):
        return f'`{path}`'
    local = Path(path)
    # a run's own model directories read better with their stage: iter0-teacher/model
    shown = local.name
    if local.name in ('model', 'final') and local.parent.name:
        shown = f'{local.parent.name}/{local.name}'
    return f'`{shown or path}` (local)'


def _hub_model_id(spec: Optional[str], pretrained: bool) -> Optional[str]:
    """The Hub repo a model's initial weights came from, if they came from the Hub."""
    if not isinstance(spec, str):
        return None
    if spec.startswith('hf-hub:'):
        return spec[len('hf-hub:'):].split('@')[0]
    if not pretrained:
        return None
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(spec)
    except Exception:  # not a timm name (a local directory): not from the Hub
        return None
    return getattr(cfg, 'hf_hub_id', None) if cfg is not None else None


def _card_number(value: Any, digits: int = 2) -> str:
    if value is None:
        return '-'
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    if isinstance(value, float):
        return f'{value:.{digits}f}' if math.isfinite(value) else '-'
    return str(value)


def _fmt_g(value: Any) -> str:
    return '-' if value is None else (f'{value:g}' if isinstance(value, float) else str(value))


def _cell(value: Any) -> str:
    """A value safe inside a markdown table cell."""
    return str(value).replace('\\', '\\\\').replace('|', '\\|').replace('\n', ' ')


def _render(template: str, **context) -> str:
    import jinja2

    from importlib import resources
    text = resources.files(__package__).joinpath('templates', template).read_text(encoding='utf-8')
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters['cell'] = _cell
    return env.from_string(text).render(**context)


def _input_desc(cfg: Dict[str, Any]) -> str:
    size = cfg.get('input_size') or (3, 224, 224)
    parts = [f'{size[-2]} x {size[-1]}']
    if cfg.get('crop_pct') is not None:
        parts.append(f"crop_pct {cfg['crop_pct']:g}")
    if cfg.get('interpolation'):
        parts.append(str(cfg['interpolation']))
    for key in ('mean', 'std'):
        if cfg.get(key) is not None:
            parts.append(f"{key} ({', '.join(f'{v:g}' for v in cfg[key])})")
    return ', '.join(parts)


def _label_names(config: Dict[str, Any]) -> List[str]:
    names = config.get('label_names') or config.get('pretrained_cfg', {}).get('label_names') or []
    return list(names.values()) if isinstance(names, dict) else [str(n) for n in names]


def _class_preview(names: Sequence[str], limit: int = 10) -> str:
    if not names:
        return ''
    shown = ', '.join(names[:limit])
    return shown + (f', ... ({len(names) - limit} more)' if len(names) > limit else '')


def _as_counts(value: Any) -> Dict[str, int]:
    """Per-class counts from a list (index = class) or a mapping of class -> count."""
    if isinstance(value, list):
        return {str(i): int(v) for i, v in enumerate(value)}
    if isinstance(value, dict):
        return {str(k): int(v) for k, v in value.items()}
    return {}


def _count_rows(stats: Dict[str, Any], names: Sequence[str]):
    """Per-class (name, before, after) rows, or a one-line summary when there are many classes."""
    before, after = _as_counts(stats.get('counts_before')), _as_counts(stats.get('counts_after'))
    if not after:
        return [], ''
    names = stats.get('label_names') if isinstance(stats.get('label_names'), list) else names

    def name_of(key):
        i = int(key) if key.lstrip('-').isdigit() else -1
        return str(names[i]) if 0 <= i < len(names) else key

    keys = sorted(set(after) | set(before), key=lambda k: (0, int(k)) if k.lstrip('-').isdigit() else (1, k))
    if len(keys) <= _MAX_CLASS_ROWS:
        return [(name_of(k), before.get(k, 0), after.get(k, 0)) for k in keys], ''
    kept = sorted(after.values())
    summary = f'min {kept[0]}, median {kept[len(kept) // 2]}, max {kept[-1]} over {len(kept)} classes'
    return [], summary


def _labels_rows(stats: Dict[str, Any], roots: Sequence[Path]) -> List[Tuple[str, str]]:
    src = stats.get('source') if isinstance(stats.get('source'), dict) else {}
    teacher = stats.get('teacher') if isinstance(stats.get('teacher'), dict) else {}
    rows = []
    if src.get('path'):
        rows.append(('unlabeled images', _split_desc(src, roots)))
    if teacher.get('spec'):
        rows.append(('teacher', _shown_path(teacher['spec'], roots)))
    if 'soft' in stats:
        kind = 'soft' if stats['soft'] else 'hard (argmax)'
        if stats.get('temperature') is not None and stats['soft']:
            kind += f", T = {_fmt_g(stats['temperature'])}"
        rows.append(('labels', kind))
    for key, name in (('threshold', 'confidence threshold'), ('per_class_target', 'per-class target'),
                      ('rows_labeled', 'images labeled'), ('rows_before', 'images above the threshold'),
                      ('rows_after', 'images kept'), ('duplicated', 'duplicates added for rare classes')):
        if stats.get(key) is not None:
            rows.append((name, _fmt_g(stats[key])))
    if 'per_class_target' in stats and stats['per_class_target'] is None:
        rows.append(('per-class target', 'none (no balancing)'))
    failed = stats.get('failed_count')
    if failed is None and isinstance(stats.get('failed_images'), list):
        failed = len(stats['failed_images'])
    if failed is not None:
        rows.append(('unreadable images skipped', str(failed)))
    return rows


def _lineage(source: ModelSource, metrics: Dict[str, Any]) -> List[Dict[str, str]]:
    """One row per model stage up to this one: iteration, stage, model, teacher, pseudo images, top-1/5."""
    stages = [s for s in run_summary(source.run_dir) if isinstance(s.get('stage'), str) and is_model_stage(s['stage'])]
    if source.run_dir is not None and (not stages or source.stage not in [s['stage'] for s in stages]):
        # no summary yet, or one from before this stage: the stage directories tell the lineage
        stages, previous = [], None
        for name in model_stages(source.run_dir):
            stages.append(dict(read_json(source.run_dir / name / 'metrics.json') or {}, stage=name, teacher=previous))
            previous = name
    if not stages and metrics:
        role = 'student' if metrics.get('noise') else 'teacher'
        stages = [dict(metrics, stage=source.stage or role)]
    if source.stage is not None:
        names = [s['stage'] for s in stages]
        if source.stage in names:
            stages = stages[:names.index(source.stage) + 1]
    roots = _local_roots(source.run_dir)
    rows = []
    for s in stages:
        match = STAGE_NAME.match(s['stage'])
        if match:
            iteration, role = match.group(1), match.group(2)
        elif s['stage'] == FINETUNE:
            iteration, role = '-', 'fine-tune'
        else:
            iteration, role = '-', s['stage']
        teacher = s.get('teacher')
        rows.append({
            'iteration': iteration, 'role': role,
            'model': _shown_path(s.get('model'), roots) if s.get('model') else '-',
            'teacher': (f'`{teacher}`' if STAGE_NAME.match(str(teacher)) else _shown_path(teacher, roots))
            if teacher else '-',
            'pseudo_images': _fmt_g(s.get('pseudo_images')) if role != 'teacher' else '-',
            'top1': _card_number(s.get('top1')), 'top5': _card_number(s.get('top5')),
        })
    return rows


def _pseudo_share(noise: Dict[str, Any], batch_size: Any) -> str:
    """The pseudo-labeled images a student step took per labeled one: the configured ratio, or the
    smaller share that data.pseudo_batch_size gave when selection kept fewer rows than that."""
    ratio, side = noise.get('unlabeled_ratio'), noise.get('pseudo_batch_size')
    if side is None or ratio is None or not batch_size or side == ratio * batch_size:
        return _fmt_g(ratio)
    return (f'{side / batch_size:.3g} ({side} pseudo-labeled beside {batch_size} labeled a step: '
            f'fewer pseudo-labeled rows than {ratio} per labeled row)')


def _settings(metrics: Dict[str, Any], run_cfg: Dict[str, Any]) -> List[Tuple[str, str]]:
    rows = []
    noise = metrics.get('noise')
    if isinstance(noise, dict):
        rows += [('input noise (RandAugment)', noise.get('randaugment') or 'none'),
                 ('dropout', _fmt_g(noise.get('dropout'))),
                 ('stochastic depth', _fmt_g(noise.get('drop_path'))),
                 ('unlabeled:labeled images per batch', _pseudo_share(noise, metrics.get('batch_size')))]
    elif metrics:
        rows.append(('noise', 'none (a teacher learns from labeled images with crop and flip only)'))
    for key, name in (('image_size', 'image size'), ('batch_size', 'labeled batch size'), ('lr', 'learning rate'),
                      ('ema_decay', 'EMA decay (evaluated and exported weights)'), ('epoch', 'epochs'),
                      ('step', 'steps'), ('labeled_images', 'labeled images'),
                      ('pseudo_images', 'pseudo-labeled images'), ('images_seen', 'images seen')):
        if metrics.get(key) is not None and not (key == 'pseudo_images' and not isinstance(noise, dict)):
            rows.append((name, _fmt_g(metrics[key])))
    train = run_cfg.get('train') if isinstance(run_cfg.get('train'), dict) else {}
    for key, name in (('preset', 'optimizer preset'), ('label_smoothing', 'label smoothing'),
                      ('mixed_precision', 'mixed precision')):
        if train.get(key) is not None:
            rows.append((name, _fmt_g(train[key])))
    if run_cfg.get('seed') is not None:
        rows.append(('seed', str(run_cfg['seed'])))
    return rows


def _eval_results(metrics: Dict[str, Any], eval_src: Dict[str, Any], roots) -> List[EvalResult]:
    if metrics.get('top1') is None or not eval_src.get('path'):
        return []
    path = eval_src['path']
    hub_id = _hub_dataset_id(path, roots)
    dataset = hub_id or (Path(path).name or path)
    common = dict(task_type='image-classification', dataset_type=dataset, dataset_name=dataset,
                  dataset_config=eval_src.get('name'), dataset_split=eval_src.get('split') or 'test')
    results = [EvalResult(metric_type='accuracy', metric_name='Top-1 Accuracy',
                          metric_value=round(float(metrics['top1']), 2), **common)]
    if metrics.get('top5') is not None:
        results.append(EvalResult(metric_type='top-5-accuracy', metric_name='Top-5 Accuracy',
                                  metric_value=round(float(metrics['top5']), 2), **common))
    return results


def _params_m(architecture: str, config: Dict[str, Any]) -> Optional[str]:
    import timm

    if not timm.is_model(architecture):
        return None
    kwargs = dict(config.get('model_args') or {})
    kwargs.setdefault('num_classes', int(config.get('num_classes', 1000)))
    try:
        return f'{count_params(architecture, **kwargs) / 1e6:.2f}'
    except Exception:  # unusual model_args: the count is a nicety, not worth failing an export
        return None


def read_model_config(model_dir: Path) -> Dict[str, Any]:
    path = model_dir / 'config.json'
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError says where: line, column, char
        raise UserError(f'{path} is not valid JSON ({e}); export the model again.') from None
    if not isinstance(config, dict) or not isinstance(config.get('architecture'), str):
        raise UserError(f'{model_dir}/config.json is not a timm model config (no "architecture"); '
                        'export the model again.')
    return config


def portable_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """config.json naming the canonical timm architecture, so timm loads it without this plugin."""
    import timm

    arch = config['architecture']
    if arch in NS_RECIPES:
        config = dict(config, architecture=NS_RECIPES[arch].base)
    elif not timm.is_model(arch):
        raise UserError(f"config.json names architecture '{arch}', which timm does not know; "
                        'export a model built from a timm architecture.')
    return config


def model_card(
        src: Union[str, os.PathLike, ModelSource],
        repo_id: Optional[str] = None,
        license: Optional[str] = None,
) -> ModelCard:
    """The Noisy Student model card of a model directory, stage or run.

    ``repo_id`` is what the usage snippet loads (a placeholder until the model is pushed).
    """
    source = resolve_source(src)
    config = portable_config(read_model_config(source.model_dir))
    pretrained_cfg = config.get('pretrained_cfg') or {}
    metrics = (read_json(source.stage_dir / 'metrics.json') if source.stage_dir else None) or {}
    run_cfg = run_config(source.run_dir)
    labels_dir = labels_dir_of(source)
    stats = (read_json(labels_dir / 'stats.json') if labels_dir else None) or {}
    roots = _local_roots(source.run_dir)
    names = _label_names(config)

    labeled, unlabeled, eval_src = (_section(run_cfg, k) for k in ('labeled', 'unlabeled', 'eval'))
    if not eval_src:  # a stage trained outside a run may record its eval split itself
        eval_src = _section(metrics, 'eval')
    if not unlabeled and isinstance(stats.get('source'), dict):
        unlabeled = stats['source']
    datasets = []
    for src_cfg in (labeled, unlabeled):
        hub_id = _hub_dataset_id(src_cfg.get('path'), roots)
        if hub_id and hub_id not in datasets:
            datasets.append(hub_id)
    teacher = _section(run_cfg, 'teacher')
    base_models = [m for m in (_hub_model_id(teacher.get('model'), bool(teacher.get('pretrained'))),
                               _hub_model_id(metrics.get('model'), False)) if m]
    base_models = [m for i, m in enumerate(base_models) if m not in base_models[:i] and m != repo_id]

    model_name = (repo_id or '').split('/')[-1] or _default_name(source)
    eval_results = _eval_results(metrics, eval_src, roots)
    card_data = ModelCardData(
        library_name='timm',
        pipeline_tag='image-classification',
        license=license or pretrained_cfg.get('license') or DEFAULT_LICENSE,
        tags=list(_TAGS),
        datasets=datasets or None,
        base_model=(base_models[0] if len(base_models) == 1 else base_models) or None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )

    lineage = _lineage(source, metrics)
    role = lineage[-1]['role'] if lineage else None
    eval_desc = ''
    if eval_src.get('path'):
        eval_desc = _shown_path(eval_src['path'], roots)
        if eval_src.get('name'):
            eval_desc += f", config `{eval_src['name']}`"
        eval_desc += f", split `{eval_src.get('split') or 'test'}`"
    data_rows = []
    if labeled.get('path'):
        data_rows.append(('labeled data', _split_desc(labeled, roots)))
    if unlabeled.get('path'):
        data_rows.append(('unlabeled data', _split_desc(unlabeled, roots)))

    labels = None
    if stats:
        classes, class_summary = _count_rows(stats, names)
        labels = {'rows': _labels_rows(stats, roots), 'classes': classes, 'class_summary': class_summary}
    hub_spec = f'hf-hub:{repo_id or PLACEHOLDER_REPO_ID}'
    text = _render(
        'modelcard.md',
        card_data=card_data.to_yaml(),
        title=model_name,
        summary=_summary_text(config, role, lineage, metrics),
        architecture=config['architecture'],
        params=_params_m(config['architecture'], config),
        num_classes=config.get('num_classes', '-'),
        class_preview=_class_preview(names),
        input_desc=_input_desc(pretrained_cfg),
        top1=_card_number(metrics.get('top1')) if metrics.get('top1') is not None else None,
        top5=_card_number(metrics.get('top5')),
        eval_desc=eval_desc,
        data_rows=data_rows,
        lineage=lineage,
        settings=_settings(metrics, run_cfg),
        labels=labels,
        is_teacher=role == 'teacher',
        hub_spec=hub_spec,
        topk=min(5, int(config.get('num_classes') or 5)),
        placeholder_note=None if repo_id else _PLACEHOLDER_NOTE,
        limits=_limits(metrics, eval_desc, pretrained_cfg, stats),
        citation=CITATION,
    )
    return ModelCard(text)


def _default_name(source: ModelSource) -> str:
    if source.run_dir is not None:
        return source.run_dir.resolve().name + (f'-{source.stage}' if source.stage and source.model_dir.name != 'final'
                                                else '')
    base = source.stage_dir if source.stage_dir is not None else source.model_dir
    return base.resolve().name


def _split_desc(src: Dict[str, Any], roots) -> str:
    desc = _shown_path(src.get('path'), roots)
    if src.get('name'):
        desc += f", config `{src['name']}`"
    return desc + f", split `{src.get('split') or 'train'}`"


def _summary_text(config: Dict[str, Any], role: Optional[str], lineage: List[Dict[str, str]],
                  metrics: Dict[str, Any]) -> str:
    model = f"An image classifier (`{config['architecture']}`, {config.get('num_classes', '?')} classes)"
    what = f'{model} trained with Noisy Student Training ([Xie et al., 2019]({_PAPER})), exported by ' \
           'timm-noisystudent. '
    if role == 'teacher':
        return what + ('This is the teacher (iteration 0): it learned from the labeled images only, and its '
                       'pseudo labels teach the noised students.')
    if role == 'student':
        which = f"the iteration {lineage[-1]['iteration']}" if lineage[-1]['iteration'] != '-' else 'a'
        return what + (f'This is {which} student: its teacher pseudo-labeled the '
                       'unlabeled images, and it learned, noised, from those and the labeled images together.')
    if role == 'fine-tune':
        return what + ('This is the last student, fine-tuned briefly on unaugmented labeled images at the test '
                       'resolution with its shallow layers frozen.')
    if metrics:
        return f'{model} trained and exported by timm-noisystudent; the run around it was not recorded.'
    return (f'{model} exported by timm-noisystudent, the Noisy Student Training plugin for timm. Its training '
            'lineage was not recorded with the weights.')


def _limits(metrics, eval_desc, pretrained_cfg, stats) -> List[str]:
    size = (pretrained_cfg.get('input_size') or (3, 224, 224))[-1]
    lines = []
    if metrics.get('top1') is not None:
        where = f'on {eval_desc}' if eval_desc else 'on an evaluation split that was not recorded'
        lines.append(f'Accuracy was measured {where} only; expect lower numbers on images unlike it.')
    else:
        lines.append('No accuracy was recorded with these weights; evaluate it before you rely on it '
                     '(`noisystudent eval`).')
    if metrics.get('labeled_images') is not None:
        lines.append(f"It learned from {metrics['labeled_images']} labeled images; classes with few examples are "
                     'the least reliable.')
    lines.append('Pseudo labels carry the teacher\'s mistakes and biases; the confidence threshold removes only '
                 'some of them.' if stats else
                 'It knows only the classes in its label set; any image gets one of them, however unlike it.')
    lines.append(f'It expects RGB images preprocessed as in the table above ({size} x {size}).')
    lines.append("License: check that the terms of the training images allow the model's intended use.")
    return lines


def bare_card(source: ModelSource, repo_id: Optional[str]) -> Optional[str]:
    """An earlier export's own card, kept (with its edits) when there is no run to rebuild it from."""
    readme = source.model_dir / 'README.md'
    if not readme.is_file():
        return None
    text = readme.read_text(encoding='utf-8')
    if repo_id:
        text = text.replace(f'\n{_PLACEHOLDER_NOTE}\n', '')
        text = text.replace(f'hf-hub:{PLACEHOLDER_REPO_ID}', f'hf-hub:{repo_id}')
    return text


def labels_card(labels_dir: Union[str, os.PathLike], repo_id: Optional[str] = None,
                license: Optional[str] = None) -> DatasetCard:
    """The dataset card of a pseudo-label directory; its YAML makes ``load_dataset`` read data/*.parquet."""
    import pyarrow.parquet as pq

    labels_dir = Path(labels_dir).expanduser()
    stats, files = labels_files(labels_dir)
    run = labels_dir.parent if is_run_dir(labels_dir.parent) else None
    roots = _local_roots(run)
    src = stats.get('source') if isinstance(stats.get('source'), dict) else {}
    source_id = _hub_dataset_id(src.get('path'), roots)
    schema = pq.read_schema(files[0])
    columns = [(f.name, str(f.type)) for f in schema if not f.name.startswith('__')]
    index_column = next((c for c in ('index', 'row_index', 'row', 'idx') if c in schema.names), None)
    names = []
    if run is not None:
        teacher_dir = run / 'iter0-teacher' / 'model'
        if (teacher_dir / 'config.json').is_file():
            names = _label_names(read_json(teacher_dir / 'config.json') or {})
    classes, class_summary = _count_rows(stats, names)
    repo_id = repo_id or PLACEHOLDER_REPO_ID
    card_data = DatasetCardData(
        license=license or 'other',
        task_categories=['image-classification'],
        tags=['noisy-student', 'pseudo-labels', 'timm-noisystudent'],
        source_datasets=[source_id] if source_id else None,
        pretty_name=f"Noisy Student pseudo labels{' for ' + source_id if source_id else ''}",
        configs=[{'config_name': 'default', 'data_files': [{'split': 'train', 'path': 'data/*.parquet'}]}],
    )
    soft = stats.get('soft')
    soft_desc = ('Each row holds the teacher\'s soft label (its class probabilities), the argmax class and the '
                 'confidence.' if soft else 'Each row holds the teacher\'s argmax class and its confidence.'
                 if soft is not None else '')
    text = _render(
        'datasetcard.md',
        card_data=card_data.to_yaml(),
        title=repo_id.split('/')[-1],
        source_desc=_split_desc(src, roots) if src.get('path') else 'an unlabeled dataset',
        soft_desc=soft_desc,
        rows=_labels_rows(stats, roots),
        classes=classes,
        class_summary=class_summary,
        columns=columns,
        has_plot=(labels_dir / 'confidence.png').is_file(),
        repo_id=repo_id,
        source_hub_id=source_id,
        source_name=src.get('name'),
        source_split=(src.get('split') or 'train'),
        index_column=index_column,
        citation=CITATION,
    )
    return DatasetCard(text)


@functools.lru_cache(maxsize=None)
def _params_of(architecture: str) -> int:
    # building L2 takes a while even on the meta device; render the ten cards with one build each
    return count_params(architecture)


def variant_card(name: str) -> ModelCard:
    """The card of a registered ``tf_efficientnet_*_ns`` variant: paper numbers, resolution, recipe, usage."""
    from timm.models import get_pretrained_cfg

    if name not in NS_RECIPES:
        raise UserError(f"unknown variant '{name}'; choose one of {', '.join(NS_RECIPES)}.")
    recipe = NS_RECIPES[name]
    timm_name = f'{recipe.base}.{recipe.tag}'
    cfg = get_pretrained_cfg(timm_name).to_dict()
    card_data = ModelCardData(
        library_name='timm',
        pipeline_tag='image-classification',
        license=cfg.get('license') or DEFAULT_LICENSE,
        tags=list(_TAGS) + ['efficientnet'],
        datasets=['imagenet-1k'],
        model_name=name,
        eval_results=[EvalResult(
            task_type='image-classification', dataset_type='imagenet-1k', dataset_name='ImageNet-1k',
            dataset_split='validation', metric_type='accuracy', metric_name='Top-1 Accuracy',
            metric_value=recipe.top1_ns, source_name='Xie et al., 2019 (arXiv 1911.04252)', source_url=_PAPER)],
    )
    size = recipe.base.rsplit('_', 1)[-1].upper()
    ratio = str(recipe.unlabeled_ratio)
    if recipe.unlabeled_ratio_last:
        ratio += f' ({recipe.unlabeled_ratio_last} in the last iteration)'
    text = _render(
        'variantcard.md',
        card_data=card_data.to_yaml(),
        name=name,
        size=size,
        base=recipe.base,
        timm_name=timm_name,
        hf_hub_id=cfg['hf_hub_id'],
        params=f'{_params_of(recipe.base) / 1e6:.1f}',
        top1_ns=_fmt_g(recipe.top1_ns),
        top1_baseline=f'{recipe.top1_baseline:g}%' if recipe.top1_baseline is not None else 'not reported',
        train_size=recipe.train_size,
        test_size=recipe.test_size,
        input_desc=_input_desc(cfg),
        randaugment_desc=(f'`{recipe.randaugment}`: 2 ops, magnitude {recipe.randaugment_magnitude}, always applied'
                          if recipe.randaugment else 'none'),
        dropout=_fmt_g(recipe.dropout),
        drop_path=_fmt_g(recipe.drop_path),
        ratio_desc=ratio,
        citation=CITATION,
    )
    return ModelCard(text)


def variant_cards() -> Dict[str, str]:
    """File name -> rendered card text, for the ten registered variants (what model_cards/ holds)."""
    return {f'{name}.md': str(variant_card(name)) for name in NS_RECIPES}

