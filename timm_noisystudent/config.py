"""Run configuration: the one source of truth for a Noisy Student run.

A run is a tree of plain dataclasses read from YAML and written back to YAML. ``files.save_config``
followed by ``load_config`` gives back an equal ``RunConfig``, so the copy saved next to a run's
outputs *is* the run. All validation happens here, once, and every mistake is a ``UserError``
with a one-line message that names the full dotted key, so later stages can trust the values.

``None`` in a field means "decide later": the pipeline fills it from the model (image size),
the variant's NS recipe (noise, unlabeled ratio) or the run length (EMA decay). Those decisions
need the models module, and this module imports nothing else from the package.
"""
import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import yaml

__all__ = [
    'UserError', 'DataSource', 'ModelStage', 'LabelsConfig', 'NoiseConfig', 'TrainConfig',
    'FinetuneConfig', 'HubConfig', 'RunConfig', 'from_dict', 'config_from_dict', 'load_config',
    'read_config_dict', 'apply_overrides', 'config_to_dict', 'config_to_yaml',
    'config_hash', 'stage_epochs', 'epochs_note', 'lr_note', 'MIXED_PRECISION_CHOICES', 'PRESETS', 'SMALL_IMAGE_MAX', 'DEFAULT_EPOCHS',
    'DEFAULT_UNLABELED_RATIO', 'DEFAULT_TOPK', 'small_data_lr', 'FULL_PROBS_MAX_CLASSES', 'ITERATE_FROM_CHOICES',
    'STUDENT_INIT_CHOICES', 'PRESET_CLIP_GRAD', 'clip_grad_of', 'clip_note', 'PRESET_CHOICES', 'PRESET_EPOCHS',
    'PRESET_MIN_STEPS', 'PRESET_STUDENT_EPOCHS', 'preset_of', 'min_steps_of', 'epochs_of', 'stage_pretrained', 'presets_note',
]


class UserError(Exception):
    """A mistake the user can fix. The CLI prints its one-line message and exits with code 2."""


MIXED_PRECISION_CHOICES = ('auto', 'bf16', 'fp16', 'no')
# px: at or below, an image is small: small-image RandAugment ops, and decoding costs about what the model does
SMALL_IMAGE_MAX = 64
# the optimizer recipe of each train.preset; lr None: small_data_lr of the model's width.
# `small-data` fits short CPU runs from random weights on a few thousand images; `finetune` is for
# stages that start from pretrained weights; `paper` is the official ImageNet recipe
PRESETS = {
    'small-data': dict(opt='adamw', lr=None, weight_decay=0.05, sched='cosine', warmup_epochs=1.0,
                       min_lr=1e-5, momentum=0.9),
    # pretrained backbones: a third of small-data's B0 lr. On cifar10-1k at 64 px a Lite0 teacher of
    # 300 steps reached 70.15 at 1e-3 against 68.25 at 3e-4, and a Lite1 student of 135 steps 73.25
    # against 68.05 (docs/decisions.md, 2026-12-08)
    'finetune': dict(opt='adamw', lr=1e-3, weight_decay=0.05, sched='cosine', warmup_epochs=1.0,
                     min_lr=1e-6, momentum=0.9),
    'paper': dict(opt='rmsproptf', lr=0.016, weight_decay=1e-5, sched='step', warmup_epochs=5.0,
                  min_lr=0.0, momentum=0.9, decay_epochs=2.4, decay_rate=0.97),
}
# train.preset 'auto': each stage gets `finetune` when it starts from pretrained weights, else `small-data`
PRESET_CHOICES = ('auto',) + tuple(PRESETS)
# the bound on each optimizer step's global gradient norm when train.clip_grad is null. small-data
# clips: unclipped, its small models' curves fell at the peak lr and the loop's restarts cost what
# the pseudo labels gained (measured on the dev tasks, docs/decisions.md); the paper's recipe does not
PRESET_CLIP_GRAD = {'small-data': 1.0, 'finetune': 1.0, 'paper': None}
# a stage's budget when train.epochs / train.min_steps are null. From random weights a few thousand
# images want 60 epochs and at least 1,000 steps; a pretrained backbone's eval curve flattens after
# a few hundred steps (measured on the pretrained dev tasks), so its teacher trains 5 epochs and at
# least 300 steps, and each student 5 passes over the longer of its streams (None: the stage
# before's). With 4,000 labels a student's two streams are about as long, and 3 epochs gave it
# fewer passes over the labels than its teacher had (docs/decisions.md, 2026-12-08)
PRESET_EPOCHS = {'small-data': 60, 'finetune': 5, 'paper': 60}
PRESET_STUDENT_EPOCHS = {'small-data': None, 'finetune': 5, 'paper': None}
PRESET_MIN_STEPS = {'small-data': 1000, 'finetune': 300, 'paper': 1000}
# small-data's peak lr falls with the square root of the model's width (the classifier's input:
# timm's head_hidden_size where a model has a head conv after pooling, as lcnet and MobileNetV3 do,
# else num_features), up to a cap. Measured on the dev tasks (docs/decisions.md): tf_efficientnet_b0
# (1280 features) trains best at 3e-3 (digits teacher 90.0 against 83.5 at 6e-3, and steadier on
# CIFAR-10), test_efficientnet (256) at 6e-3 (cifar10-4k: the loop 63.96 against 60.46 at 3e-3);
# lcnet_050 (256 pooled, 1280 at the classifier) at 3e-3 (cifar10-4k-small teacher 40.35 against 30.85)
SMALL_DATA_LR = 3e-3  # at SMALL_DATA_LR_FEATURES
SMALL_DATA_LR_FEATURES = 1280
SMALL_DATA_LR_MAX = 6e-3


def small_data_lr(num_features: int) -> float:
    """The small-data preset's peak AdamW lr for a model whose classifier reads ``num_features``."""
    scaled = SMALL_DATA_LR * math.sqrt(SMALL_DATA_LR_FEATURES / max(int(num_features), 1))
    return float(f'{min(SMALL_DATA_LR_MAX, scaled):.3g}')


PER_CLASS_WORDS = ('auto', 'none')
ITERATE_FROM_CHOICES = ('best', 'last')  # which model labels the next iteration
STUDENT_INIT_CHOICES = ('teacher', 'scratch')  # where a student of its teacher's architecture starts
DEFAULT_EPOCHS = PRESET_EPOCHS['small-data']  # from random weights
DEFAULT_UNLABELED_RATIO = 3  # when the variant has no NS recipe
DEFAULT_TOPK = 10  # pseudo-labels keep the top-k probabilities ...
FULL_PROBS_MAX_CLASSES = 100  # ... above this many classes; below, the full distribution


@dataclass
class DataSource:
    """Anything ``datasets.load_dataset`` takes, or a ``save_to_disk`` directory."""
    path: str  # Hub id, local image folder, parquet dir, save_to_disk dir
    name: Optional[str] = None  # dataset config name; the YAML key `config` is an alias
    split: str = 'train'  # slicing allowed: "train[:4000]", "train[:10%]"
    image_column: Optional[str] = None  # None = detect
    label_column: Optional[str] = None  # None = detect
    streaming: bool = False


@dataclass
class ModelStage:
    """The teacher or one student; None fields fall back as the comments say."""
    model: str = 'tf_efficientnet_b0'  # timm name, hf-hub:org/name, or local dir
    # start from the model's pretrained weights (new head). None: false for the teacher; a student
    # takes the teacher's, so a pretrained run's larger students keep their own pretraining
    pretrained: Optional[bool] = None
    # teacher: passes over the labeled data (default train.epochs, else its preset's). Student: passes over the
    # longer of its two streams, the labeled images at B a step or the pseudo-labeled ones at
    # ratio*B a step, so a student never trains fewer steps per epoch than its teacher, however
    # few rows selection kept (default: the previous stage's epochs).
    epochs: Optional[int] = None
    image_size: Optional[int] = None  # the model's own pretrained input size
    lr: Optional[float] = None  # None -> train.lr
    batch_size: Optional[int] = None
    randaugment: Optional[str] = None  # students only; None -> noise.randaugment, then the recipe
    dropout: Optional[float] = None
    drop_path: Optional[float] = None
    unlabeled_ratio: Optional[int] = None  # students only


@dataclass
class LabelsConfig:
    soft: bool = True
    temperature: float = 1.0
    threshold: float = 0.3  # in [0, 1]
    # 'auto' | 'none' | positive int. auto: the median per-class count above the threshold, and at
    # least half an even share of the labeled rows, so a weak teacher never leaves a near-empty set
    per_class: Union[str, int] = 'auto'
    # a class with fewer than N rows above the threshold is filled with its most confident rows
    # below it (before any row is duplicated); false: only rows above the threshold are used
    fill: bool = True
    topk: Optional[int] = None  # None -> full probs up to FULL_PROBS_MAX_CLASSES, else DEFAULT_TOPK
    batch_size: int = 128
    mixed_precision: str = 'auto'  # 'auto' | 'bf16' | 'fp16' | 'no'


@dataclass
class NoiseConfig:
    """Student noise defaults for all students; None -> the variant's recipe."""
    randaugment: Optional[str] = None  # "rand-m9-n2-mstd0.5" (timm), "tf-m15-n2" (TF-style), "none"
    dropout: Optional[float] = None
    drop_path: Optional[float] = None


@dataclass
class TrainConfig:
    # the teacher's epochs when teacher.epochs is None; None: its preset's (PRESET_EPOCHS: 60 from
    # random weights, 5 from pretrained ones, whose students train 5 too: PRESET_STUDENT_EPOCHS)
    epochs: Optional[int] = None
    batch_size: int = 64
    eval_batch_size: Optional[int] = None
    unlabeled_ratio: Optional[int] = None  # None -> variant recipe, else DEFAULT_UNLABELED_RATIO
    # 'auto': finetune for a stage that starts from pretrained weights, small-data otherwise;
    # 'small-data' (AdamW + cosine, lr from the width) | 'finetune' (AdamW + cosine, lr 1e-3) |
    # 'paper' (RMSProp-TF, step 0.97/2.4 ep)
    preset: str = 'auto'
    opt: Optional[str] = None  # override of the preset's timm optimizer name
    # peak lr; None -> the preset's: paper 0.016; small-data from the model's width (small_data_lr:
    # 3e-3 for tf_efficientnet_b0, 6e-3 for narrow models such as test_efficientnet)
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    momentum: Optional[float] = None
    sched: Optional[str] = None
    warmup_epochs: Optional[float] = None
    min_lr: Optional[float] = None
    label_smoothing: float = 0.1
    # 'teacher': a student of its teacher's architecture starts from the teacher's weights, so the
    # loop's steps add up instead of starting over (measured on the dev tasks, docs/decisions.md);
    # 'scratch': every student starts from random weights, as the paper's ImageNet runs do
    student_init: str = 'teacher'
    ema_decay: Optional[float] = None  # None -> chosen from run length
    ema_warmup: bool = True
    mixed_precision: str = 'auto'  # 'auto' | 'bf16' | 'fp16' | 'no'
    channels_last: bool = True
    grad_accum_steps: int = 1
    # the largest global gradient norm an optimizer step takes (torch's clip_grad_norm_); None: the
    # preset's (PRESET_CLIP_GRAD: small-data and finetune 1.0, paper none); 0: no clipping
    clip_grad: Optional[float] = None
    compile: bool = False
    num_workers: Optional[int] = None
    # steps; None -> epoch ends only. An epoch end checkpoints when 100 steps passed since the last
    # checkpoint, and always at the stage's last step or on SIGTERM/SIGINT
    checkpoint_every: Optional[int] = None
    keep_checkpoints: int = 2
    log_with: Optional[str] = None  # accelerate tracker: tensorboard, wandb, ...
    # every teacher and student stage sees at least this many batches of batch_size images: a small
    # labeled set's epochs are repeated (30 epochs of 100 labeled digits are 30 steps). A student step
    # of B labeled + ratio x B pseudo-labeled images counts 1 + ratio, so a student trains at least
    # its teacher's images, not 1 + ratio times them (measured on the dev tasks: on digits the
    # students of 1,000 steps overfit their pseudo labels, docs/decisions.md); 0 = off; None: the
    # preset's (PRESET_MIN_STEPS: 1000 from random weights, 300 from pretrained ones)
    min_steps: Optional[int] = None
    max_steps: Optional[int] = None  # cap for tests and smoke runs


@dataclass
class FinetuneConfig:
    epochs: int = 0  # 0 = no fine-tune stage
    image_size: Optional[int] = None
    lr: Optional[float] = None
    freeze_blocks: int = 2  # stem + first N blocks frozen


@dataclass
class HubConfig:
    repo_id: Optional[str] = None
    private: bool = False


@dataclass
class RunConfig:
    labeled: DataSource
    unlabeled: DataSource
    eval: Optional[DataSource] = None
    # held-out labeled data that chooses the next teacher (iterate_from: best); without it the
    # eval split does, and its numbers then also picked the model
    validation: Optional[DataSource] = None
    iterate_from: str = 'best'  # 'best': the best model so far labels the next iteration; 'last'
    teacher: ModelStage = field(default_factory=ModelStage)
    students: List[ModelStage] = field(default_factory=lambda: [ModelStage()])  # [] = teacher only
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    output: str = 'runs/noisystudent'
    seed: int = 0
    hub: HubConfig = field(default_factory=HubConfig)


def preset_of(train: TrainConfig, pretrained: bool) -> str:
    """The preset a stage trains with: train.preset, or for 'auto' the one its starting weights call for."""
    if train.preset != 'auto':
        return train.preset
    return 'finetune' if pretrained else 'small-data'


def min_steps_of(train: TrainConfig, pretrained: bool = False) -> int:
    return train.min_steps if train.min_steps is not None else PRESET_MIN_STEPS[preset_of(train, pretrained)]


def epochs_of(train: TrainConfig, pretrained: bool = False, student: bool = False) -> int:
    preset = preset_of(train, pretrained)
    if student and PRESET_STUDENT_EPOCHS[preset] is not None:
        return PRESET_STUDENT_EPOCHS[preset]
    return train.epochs if train.epochs is not None else PRESET_EPOCHS[preset]


def stage_pretrained(cfg: RunConfig) -> List[bool]:
    """Whether the teacher, then each student, starts from pretrained weights (students default to the teacher's)."""
    teacher = bool(cfg.teacher.pretrained)
    return [teacher] + [teacher if s.pretrained is None else bool(s.pretrained) for s in cfg.students]


def stage_epochs(cfg: RunConfig) -> List[int]:
    """Epochs of the teacher, then of each student, with the None fallbacks resolved.

    A student without its own epochs takes its preset's student epochs (finetune: 5), else the stage's
    before it when that trained with the same preset, else its preset's.
    """
    pretrained = stage_pretrained(cfg)
    epochs = [cfg.teacher.epochs if cfg.teacher.epochs is not None else epochs_of(cfg.train, pretrained[0])]
    for k, student in enumerate(cfg.students, start=1):
        preset = preset_of(cfg.train, pretrained[k])
        if PRESET_STUDENT_EPOCHS[preset] is not None:
            default = PRESET_STUDENT_EPOCHS[preset]
        elif preset == preset_of(cfg.train, pretrained[k - 1]):
            default = epochs[-1]
        else:
            default = epochs_of(cfg.train, pretrained[k])
        epochs.append(student.epochs if student.epochs is not None else default)
    return epochs


def epochs_note(cfg: RunConfig) -> str:
    """What ``epochs`` means for each stage of ``cfg``, as YAML comments (--print-config shows them)."""
    names = ['iter0-teacher'] + [f'iter{k}-student' for k in range(1, len(cfg.students) + 1)]
    resolved = ', '.join(f'{n} {e}' for n, e in zip(names, stage_epochs(cfg)))
    min_steps = ', '.join(f'{n} {min_steps_of(cfg.train, p)}' for n, p in zip(names, stage_pretrained(cfg)))
    return ('# epochs: a teacher epoch is one pass over the labeled images, train.batch_size a step. A student\n'
            '# epoch is one pass over the longer of its two streams: the labeled images at batch_size a step, or\n'
            '# the pseudo-labeled images at unlabeled_ratio x batch_size a step. So a student trains at least as\n'
            '# many steps as a teacher with the same epochs, however few rows selection keeps. Every teacher\n'
            '# and student stage sees at least train.min_steps batches of batch_size images\n'
            '# (a student step counts 1 + unlabeled_ratio): short epochs repeat. With fewer pseudo-labeled rows\n'
            '# than unlabeled_ratio per labeled row, a step takes their share (batch_size x pseudo / labeled),\n'
            '# so a pseudo-labeled row is not seen more often than a labeled one.\n'
            f'# resolved epochs: {resolved}\n'
            f'# resolved min_steps: {min_steps}')


def clip_grad_of(train: TrainConfig, pretrained: bool = False) -> Optional[float]:
    """The gradient-norm bound a stage trains with: train.clip_grad, else the preset's; None: no clipping."""
    value = train.clip_grad if train.clip_grad is not None else PRESET_CLIP_GRAD[preset_of(train, pretrained)]
    return float(value) if value else None


def clip_note(cfg: RunConfig) -> str:
    """What train.clip_grad resolves to, as a YAML comment line ('' when it is given)."""
    if cfg.train.clip_grad is not None:
        return ''
    bounds = sorted({clip_grad_of(cfg.train, p) or 0 for p in stage_pretrained(cfg)})
    said = ', '.join(f"each step's global gradient norm at most {b:g}" if b else 'no clipping' for b in bounds)
    return f"# clip_grad: null -> the presets': {said}; 0: no clipping\n"


def presets_note(cfg: RunConfig) -> str:
    """Which preset each stage trains with, and its optimizer recipe, as YAML comment lines."""
    names = ['iter0-teacher'] + [f'iter{k}-student' for k in range(1, len(cfg.students) + 1)]
    lines = []
    for name, pretrained in zip(names, stage_pretrained(cfg)):
        preset = preset_of(cfg.train, pretrained)
        recipe = {k: v for k, v in PRESETS[preset].items() if k != 'momentum'}
        recipe.update({k: getattr(cfg.train, k) for k in recipe if getattr(cfg.train, k, None) is not None})
        why = f" ({'pretrained' if pretrained else 'random'} weights)" if cfg.train.preset == 'auto' else ''
        shown = ', '.join(f'{k} {v:g}' if isinstance(v, float) else f'{k} {v}' for k, v in recipe.items()
                          if v is not None)
        lines.append(f'# {name}: preset {preset}{why}: {shown}')
    return '\n'.join(lines) + '\n'


def lr_note(cfg: RunConfig) -> str:
    """How each stage's peak lr is chosen, as a YAML comment line ('' when every lr is given)."""
    if cfg.train.lr is not None:
        return ''
    stages = [s for s, p in zip([cfg.teacher] + list(cfg.students), stage_pretrained(cfg))
              if PRESETS[preset_of(cfg.train, p)]['lr'] is None]
    if all(s.lr is not None for s in stages):
        return ''
    return (f'# lr: null -> small-data picks each model\'s from its width: {SMALL_DATA_LR:g} x '
            f'sqrt({SMALL_DATA_LR_FEATURES} / width), at most {SMALL_DATA_LR_MAX:g}; width: the classifier\'s input\n')


# --- value rules: checked after the type, skipped for None --------------------------------------

Rule = Callable[[Any, str], None]


def _at_least(low) -> Rule:
    def check(value, key):
        if value < low:
            raise UserError(f'{key} must be at least {low}, got {_shown(value)}')
    return check


def _above(low) -> Rule:
    def check(value, key):
        if value <= low:
            raise UserError(f'{key} must be greater than {low}, got {_shown(value)}')
    return check


def _within(low, high) -> Rule:
    def check(value, key):
        if not low <= value <= high:
            raise UserError(f'{key} must be between {low} and {high}, got {_shown(value)}')
    return check


def _fraction(value, key) -> None:
    # dropout 1.0 would zero every activation; a rate must stay below 1
    if not 0 <= value < 1:
        raise UserError(f'{key} must be in [0, 1) (at least 0, below 1), got {_shown(value)}')


def _one_of(choices: Sequence[str]) -> Rule:
    def check(value, key):
        if value not in choices:
            close = _closest(str(value), choices)
            hint = f"; did you mean '{close}'?" if close else ''
            raise UserError(f'{key} must be one of {_listed(choices)}, got {_shown(value)}{hint}')
    return check


def _not_empty(value, key) -> None:
    if not value.strip():
        raise UserError(f'{key} must not be empty')


_PER_CLASS_HELP = "'auto', 'none' or a positive integer"


def _per_class(value, key) -> None:
    if isinstance(value, str) and value in PER_CLASS_WORDS:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return
    raise UserError(f'{key} must be {_PER_CLASS_HELP}, got {_shown(value)}')

# By field name: the same name means the same thing in every section.
_RULES: Dict[str, Rule] = {
    'path': _not_empty,
    'split': _not_empty,
    'output': _not_empty,
    'model': _not_empty,
    'epochs': _at_least(1),
    'batch_size': _at_least(1),
    'eval_batch_size': _at_least(1),
    'grad_accum_steps': _at_least(1),
    'image_size': _at_least(1),
    'unlabeled_ratio': _at_least(1),
    'topk': _at_least(1),
    'checkpoint_every': _at_least(1),
    'keep_checkpoints': _at_least(1),
    'max_steps': _at_least(1),
    'min_steps': _at_least(0),
    'num_workers': _at_least(0),
    'freeze_blocks': _at_least(0),
    'lr': _above(0),
    'clip_grad': _at_least(0),
    'temperature': _above(0),
    'min_lr': _at_least(0),
    'weight_decay': _at_least(0),
    'warmup_epochs': _at_least(0),
    'threshold': _within(0, 1),
    'dropout': _fraction,
    'drop_path': _fraction,
    'momentum': _fraction,
    'label_smoothing': _fraction,
    'ema_decay': _fraction,
    'per_class': _per_class,
    'mixed_precision': _one_of(MIXED_PRECISION_CHOICES),
    'preset': _one_of(PRESET_CHOICES),
    'iterate_from': _one_of(ITERATE_FROM_CHOICES),
    'student_init': _one_of(STUDENT_INIT_CHOICES),
    'seed': _within(0, 2 ** 32 - 1),  # numpy's seed range
}
# Where a section means something else by the same name.
_CLASS_RULES: Dict[tuple, Rule] = {
    ('FinetuneConfig', 'epochs'): _at_least(0),  # 0 = no fine-tune stage
}
# YAML keys accepted for a field, per class.
_ALIASES: Dict[str, Dict[str, str]] = {
    'DataSource': {'config': 'name'},
}
# How a type error describes a field whose type alone says too little.
_TYPE_HELP: Dict[str, str] = {
    'per_class': _PER_CLASS_HELP,
}
_STUDENT_ONLY = {'randaugment': 'noise', 'unlabeled_ratio': 'train'}  # -> section for all students


def _rule_of(cls: type, name: str) -> Optional[Rule]:
    return _CLASS_RULES.get((cls.__name__, name), _RULES.get(name))


def _check_run(cfg: RunConfig) -> None:
    # the teacher sees no pseudo-labels and no student noise; a value there would be ignored
    for name, section in _STUDENT_ONLY.items():
        if getattr(cfg.teacher, name) is not None:
            raise UserError(f'teacher.{name} applies to students only; set it on a student '
                            f'(students.N.{name}) or for all of them ({section}.{name})')


_CLASS_CHECKS: Dict[str, Callable[[Any], None]] = {
    'RunConfig': _check_run,
}


# --- dict -> dataclass ----------------------------------------------------------------------------

def from_dict(cls: type, d: Any, where: str = ''):
    """An instance of dataclass ``cls`` from a YAML-style mapping, validated.

    ``where`` is the dotted key of ``d`` in the whole config; messages name ``where.field``.
    """
    d = _renamed_aliases(cls, _mapping_of(cls, d, where), where)
    _check_known_keys(cls, d, where)
    types = _field_types(cls)
    values = {}
    for f in dataclasses.fields(cls):
        key = _dotted(where, f.name)
        value = d.get(f.name)
        if _is_required(f) and value is None:
            raise UserError(_missing_message(cls, key))
        if f.name not in d:
            continue
        value = _value_of(types[f.name], _unyamled(f.name, value), key, f.name)
        rule = _rule_of(cls, f.name)
        if rule is not None and value is not None:
            rule(value, key)
        values[f.name] = value
    obj = cls(**values)
    check = _CLASS_CHECKS.get(cls.__name__)
    if check is not None:
        check(obj)
    return obj


def config_from_dict(d: Any) -> RunConfig:
    """A validated ``RunConfig`` from a YAML-style mapping."""
    return from_dict(RunConfig, d)


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _dotted(where: str, name: Any) -> str:
    return f'{where}.{name}' if where else str(name)


def _missing_message(cls: type, key: str) -> str:
    if cls is DataSource:
        return (f"missing required config key '{key}'; set it to a Hub dataset id, an image folder, "
                "a parquet directory or a save_to_disk directory")
    return f"missing required config key '{key}'; add {key}: {{path: ...}} with the dataset to use"


def _mapping_of(cls: type, d: Any, where: str) -> Mapping:
    # a section left empty in YAML (`labels:`) reads as None: all defaults
    if d is None:
        return {}
    if isinstance(d, cls):
        return dataclasses.asdict(d)
    if not isinstance(d, Mapping):
        what = f"'{where}'" if where else 'the config'
        raise UserError(f'{what} must be a mapping of keys to values, got {_shown(d)}')
    return d


def _renamed_aliases(cls: type, d: Mapping, where: str) -> Dict:
    aliases = _ALIASES.get(cls.__name__, {})
    out = dict(d)
    for alias, name in aliases.items():
        if alias not in out:
            continue
        if name in out:
            raise UserError(f"'{_dotted(where, alias)}' is an alias of '{_dotted(where, name)}'; "
                            'give only one of them')
        out[name] = out.pop(alias)
    return out


def _check_known_keys(cls: type, d: Mapping, where: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)] + list(_ALIASES.get(cls.__name__, {}))
    for key in d:
        if key not in known:
            raise UserError(f"unknown config key '{_dotted(where, key)}'"
                            + _did_you_mean(str(key), known, where))


def _did_you_mean(word: str, choices: Sequence[str], where: str) -> str:
    close = _closest(word, choices)
    if close:
        return f"; did you mean '{_dotted(where, close)}'?"
    section = f"'{where}'" if where else 'the top level'
    return f'; valid keys in {section}: {", ".join(choices)}'


def _closest(word: str, choices: Sequence[str]) -> Optional[str]:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def _unyamled(name: str, value: Any) -> Any:
    # YAML 1.1 reads a bare `no` as false; `mixed_precision: no` means the string
    if name == 'mixed_precision' and value is False:
        return 'no'
    return value


def _value_of(tp: Any, value: Any, key: str, name: str) -> Any:
    """``value`` converted to type ``tp``, or a UserError naming ``key``."""
    if typing.get_origin(tp) is Union:
        return _union_value(tp, value, key, name)
    if typing.get_origin(tp) in (list, List):
        return _list_value(typing.get_args(tp)[0], value, key, name)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp is DataSource:
            value = {'path': value}  # `labeled: cifar10` is short for `labeled: {path: cifar10}`
        if value is not None and not isinstance(value, (Mapping, tp)):
            raise _type_error(tp, value, key, name)
        return from_dict(tp, value, key)
    return _scalar_value(tp, value, key, name)


def _union_value(tp: Any, value: Any, key: str, name: str) -> Any:
    options = [t for t in typing.get_args(tp) if t is not type(None)]
    if value is None:
        if len(options) < len(typing.get_args(tp)):
            return None
        raise _type_error(tp, value, key, name)
    if len(options) == 1:
        try:
            return _value_of(options[0], value, key, name)
        except _WrongType as exc:
            if exc.key != key:  # a mistake inside a nested section keeps its own message
                raise
            raise _WrongType(key, f'{exc.wanted} or null', value) from None
    for option in options:
        if _is_exactly(option, value):
            return value
    raise _type_error(tp, value, key, name)


def _list_value(item_type: Any, value: Any, key: str, name: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise _type_error(List[item_type], value, key, name)
    return [_value_of(item_type, item, f'{key}.{i}', name) for i, item in enumerate(value)]


def _is_exactly(tp: type, value: Any) -> bool:
    # bool is an int subclass in Python, but `epochs: true` is a mistake, not 1
    return isinstance(value, tp) and not (isinstance(value, bool) and tp is not bool)


def _scalar_value(tp: type, value: Any, key: str, name: str) -> Any:
    if _is_exactly(tp, value):
        if tp is float and not math.isfinite(value):
            raise _type_error(tp, value, key, name, finite=True)
        return value
    if tp is float and _is_exactly(int, value):
        return float(value)
    if tp is float and isinstance(value, str):
        return _float_from_text(value, key, name)
    if tp is str and _is_exactly(int, value):
        return str(value)  # `name: 2017` is a config called "2017"
    raise _type_error(tp, value, key, name)


def _float_from_text(text: str, key: str, name: str) -> float:
    # PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; users mean the number
    try:
        value = float(text.strip())
    except ValueError:
        raise _type_error(float, text, key, name) from None
    if not math.isfinite(value):
        raise _type_error(float, text, key, name, finite=True)
    return value


class _WrongType(UserError):
    """A value of the wrong type at ``key``; an Optional field adds "or null" to ``wanted``."""

    def __init__(self, key: str, wanted: str, value: Any):
        super().__init__(f'{key} must be {wanted}, got {_shown(value)}')
        self.key = key
        self.wanted = wanted


def _type_error(tp: Any, value: Any, key: str, name: str, finite: bool = False) -> UserError:
    wanted = 'a finite number' if finite else _TYPE_HELP.get(name) or _described(tp)
    return _WrongType(key, wanted, value)


def _described(tp: Any) -> str:
    if typing.get_origin(tp) is Union:
        args = typing.get_args(tp)
        words = [_described(t) for t in args if t is not type(None)]
        if len(words) < len(args):
            words.append('null')
        return ' or '.join(words)
    if typing.get_origin(tp) in (list, List):
        return f'a list of {_plural(typing.get_args(tp)[0])}'
    if tp is DataSource:
        return 'a path string or a mapping with a path'
    if dataclasses.is_dataclass(tp):
        return 'a mapping'
    return {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string'}[tp]


def _plural(tp: Any) -> str:
    return 'mappings' if dataclasses.is_dataclass(tp) else _described(tp)


def _shown(value: Any) -> str:
    """``value`` as it would read in YAML, short and on one line."""
    if value is None:
        return 'null'
    if isinstance(value, bool):
        return 'true' if value else 'false'
    # reprlib bounds the work: a YAML alias bomb expands to billions of items in a plain repr
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + '...'


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxdict, _SHORT_REPR.maxstring = 3, 4, 4, 60


def _listed(choices: Sequence[str]) -> str:
    return ', '.join(repr(c) for c in choices)


# --- YAML in -------------------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice; PyYAML would silently keep the last one."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
        if key in seen:
            mark = key_node.start_mark
            raise UserError(f'{mark.name}: key {key!r} appears twice (line {mark.line + 1}); keep one')
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_config_dict(path: Union[str, os.PathLike]) -> Dict:
    """The raw mapping in a YAML config file, before overrides and validation."""
    path = Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except FileNotFoundError:
        raise UserError(f'config file {path} not found; check the path') from None
    except IsADirectoryError:
        raise UserError(f'config file {path} is a directory; pass a YAML file') from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f'cannot read config file {path}: {_one_line(str(exc))}') from None
    try:
        data = yaml.load(text, Loader=_loader_for(path))
    except yaml.YAMLError as exc:
        raise UserError(_yaml_error_message(path, exc)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f'config file {path} must hold a mapping of keys to values, got {_shown(data)}')
    return data


def _loader_for(path: Path):
    # the stream name in marks is the file, so duplicate-key messages can name it
    def make(stream):
        loader = _StrictLoader(stream)
        loader.name = str(path)
        return loader
    return make


def _yaml_error_message(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, 'problem_mark', None)
    where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
    problem = getattr(exc, 'problem', None) or str(exc)
    return f'config file {path} is not valid YAML{where}: {_one_line(problem)}; fix the syntax there'


def _one_line(text: str) -> str:
    return ' '.join(text.split())


def load_config(path: Union[str, os.PathLike], overrides: Sequence[str] = ()) -> RunConfig:
    """A validated ``RunConfig`` from a YAML file, with ``key=value`` overrides applied on top."""
    return config_from_dict(apply_overrides(read_config_dict(path), overrides))


# --- key=value overrides -------------------------------------------------------------------------

def apply_overrides(cfg_dict: Optional[Mapping], overrides: Sequence[str]) -> Dict:
    """A copy of ``cfg_dict`` with ``dotted.key=value`` overrides set; values are parsed as YAML.

    List items are addressed by index (``students.0.model=...``); the index one past the end adds
    an item. Unknown keys pass through: ``config_from_dict`` rejects them with a suggestion.
    """
    out = copy.deepcopy(dict(cfg_dict or {}))
    for override in overrides:
        key, value = _parsed_override(override)
        _set_dotted(out, key, value)
    return out


def _parsed_override(override: str):
    key, sep, text = override.partition('=')
    key = key.strip()
    if not sep or not key:
        raise UserError(f'bad override {override!r}; write it as key=value, e.g. train.lr=1e-3')
    parts = key.split('.')
    if any(not p for p in parts):
        raise UserError(f'bad override key {key!r}; use dotted keys such as teacher.epochs=5')
    return parts, _override_value(text)


def _override_value(text: str) -> Any:
    # a value that is not valid YAML (`runs/*`) is meant as the plain string
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(root: Dict, parts: List[str], value: Any) -> None:
    node: Any = root
    for depth, part in enumerate(parts[:-1]):
        here = '.'.join(parts[:depth + 1])
        slot = _slot(node, part, here, parts)
        child = node[slot] if slot != _APPEND and _has(node, slot) else None
        if isinstance(child, str) and here in _DATA_SOURCE_KEYS:
            child = {'path': child}  # `labeled: cifar10` given in short form
        if child is None:
            child = [] if parts[depth + 1].isdigit() else {}
        elif not isinstance(child, (dict, list)):
            raise UserError(f"cannot set '{'.'.join(parts)}': '{here}' is {_shown(child)}, not a section")
        _store(node, slot, child)
        node = child
    slot = _slot(node, parts[-1], '.'.join(parts), parts)
    _store(node, slot, value)


_APPEND = object()
_DATA_SOURCE_KEYS = ('labeled', 'unlabeled', 'eval', 'validation')


def _slot(node: Any, part: str, here: str, parts: List[str]):
    if isinstance(node, dict):
        return part
    if not part.isdigit():
        raise UserError(f"cannot set '{'.'.join(parts)}': '{here.rpartition('.')[0]}' is a list; "
                        f'use an index such as {here.rpartition(".")[0]}.0')
    index = int(part)
    if index == len(node):
        return _APPEND
    if index > len(node):
        raise UserError(f"cannot set '{'.'.join(parts)}': '{here.rpartition('.')[0]}' has {len(node)} "
                        f'entries; use an index up to {len(node)} (that one adds an entry)')
    return index


def _has(node: Any, slot: Any) -> bool:
    return slot in node if isinstance(node, dict) else True


def _store(node: Any, slot: Any, value: Any) -> None:
    if slot is _APPEND:
        node.append(value)
    else:
        node[slot] = value


# --- dataclass -> YAML out -----------------------------------------------------------------------

def config_to_dict(cfg: Any) -> Dict:
    """A plain mapping of a config dataclass: what ``config_from_dict`` reads back to ``cfg``."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Any) -> str:
    """``cfg`` as YAML text, keys in field order, that reads back to exactly ``cfg``."""
    data = config_to_dict(cfg)
    text = _yaml_text(data, allow_unicode=True)
    # PyYAML writes some characters (NEL, LS, PS) raw and reads them back as line breaks;
    # escaping everything outside ASCII is exact, so it is the fallback for such strings
    if yaml.safe_load(text) != data:
        text = _yaml_text(data, allow_unicode=False)
    return text


def _yaml_text(data: Dict, allow_unicode: bool) -> str:
    # a huge width keeps each value on one line, readable and diff-friendly
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False,
                          allow_unicode=allow_unicode, width=2 ** 30)


# --- hashing -------------------------------------------------------------------------------------

def config_hash(part: Any) -> str:
    """A short stable sha256 of a config dataclass or mapping, from its canonical JSON.

    Hash dataclasses rather than raw YAML mappings: their values are normalised (``lr: 1`` is
    1.0), so equal configs hash equal.
    """
    text = json.dumps(_plain(part), sort_keys=True, separators=(',', ':'), ensure_ascii=True,
                      allow_nan=False, default=str)
    return hashlib.sha256(text.encode('ascii')).hexdigest()[:16]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
