"""The Accelerate train/eval loop, used by teacher and student alike.

``train`` reads top to bottom: data, model, optimizer, then one loop in which every
distributed detail is one Accelerate call. A teacher trains on labeled images with crop/flip;
a student (``pseudo`` given) trains noised on one concatenated batch of B labeled and
ratio*B pseudo-labeled images, so BatchNorm sees the mix.
"""
import difflib
import functools
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from accelerate import skip_first_batches
from accelerate.utils import set_seed
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from . import augment
from .config import (DEFAULT_UNLABELED_RATIO, PRESETS, ModelStage, NoiseConfig, TrainConfig, UserError,
                     clip_grad_of, epochs_of, min_steps_of, preset_of, small_data_lr)
from .files import (DiskFull, append_jsonl, fsync_file, full_disk_errno, keep_jsonl_until, mebibytes, output_lock,
                    replace_dir, warn_if_short_of_space, write_json_atomic)
from .data import (
    SourceLike, eval_loader, labeled_set, source_record, train_loaders, train_rows,
)
from .runtime import (
    Preempted, StopFlag, choose_workers, cpu_threads, make_accelerator, num_workers_for, process_state, progress_bar,
    resolve_precision, torch_threads,
)
from .models import (
    architecture_of, classifier_width, crop_small_map_depthwise, data_config_of, label_names_of as model_label_names,
    load_model,
    ns_recipe, save_model,
    small_input_warning, small_map_depthwise_pays, zero_new_head,
)

# the student noise at 64 px and below when neither the config nor the variant's recipe names one:
# on CIFAR-10 with 4,000 labels (test_efficientnet, 32 px) it lifted the last student from 58.6%
# to 59.5% top-1 (docs/results.md)
SMALL_IMAGE_NOISE = 'tf-m6-n2'


def _stop_requested(accelerator, stop: 'StopFlag') -> Optional[int]:
    """The signal that asks this run to stop, agreed by every process (they must stop at the same step)."""
    if accelerator.num_processes == 1:
        return stop.signal
    flag = torch.tensor([stop.signal or 0], device=accelerator.device)
    return int(accelerator.reduce(flag, 'max').item()) or None


def _preempted(signum: int, state: Dict[str, Any], ckpt_root: Path) -> Preempted:
    return Preempted(f'stopped by signal {signum} at step {state["step"]}; checkpoint saved in {ckpt_root}.', signum)


@dataclass
class Stage:
    """One training stage resolved to concrete numbers."""
    model: str
    pretrained: bool
    epochs: int
    image_size: Optional[int]
    batch_size: int
    lr: Optional[float]  # None: the small-data preset's, from the model's width (resolved in train)
    randaugment: Optional[str]
    dropout: float
    drop_path: float
    unlabeled_ratio: int
    opt: Dict[str, Any] = field(default_factory=dict)
    preset: str = 'small-data'  # the recipe opt came from (config.preset_of)


def resolve_stage(stage: ModelStage, train_cfg: TrainConfig, noise: NoiseConfig, student: bool) -> Stage:
    """Concrete settings for a stage: its own keys, then the run's, then the variant recipe."""
    recipe = ns_recipe(stage.model) if student else None
    pretrained = bool(stage.pretrained)
    preset = preset_of(train_cfg, pretrained)
    opt = dict(PRESETS[preset])
    for key in ('opt', 'lr', 'weight_decay', 'momentum', 'sched', 'warmup_epochs', 'min_lr'):
        if getattr(train_cfg, key) is not None:
            opt[key] = getattr(train_cfg, key)
    if stage.lr is not None:
        opt['lr'] = stage.lr

    def pick(own, run, from_recipe, default):
        return next(v for v in (own, run, from_recipe, default) if v is not None)

    if student:
        # without a recipe's RandAugment, small images get the one measured on the dev tasks
        small = stage.image_size is not None and augment.is_small_image(stage.image_size)
        randaugment = pick(stage.randaugment, noise.randaugment,
                           recipe.randaugment if recipe else None, SMALL_IMAGE_NOISE if small else 'none')
        dropout = pick(stage.dropout, noise.dropout, recipe.dropout if recipe else None, 0.2)
        drop_path = pick(stage.drop_path, noise.drop_path, recipe.drop_path if recipe else None, 0.2)
        ratio = pick(stage.unlabeled_ratio, train_cfg.unlabeled_ratio,
                     recipe.unlabeled_ratio if recipe else None, DEFAULT_UNLABELED_RATIO)
    else:
        # the teacher is not noised beyond crop/flip; its own dropout keeps timm's default
        randaugment, ratio = 'none', 0
        dropout = stage.dropout if stage.dropout is not None else 0.2
        drop_path = stage.drop_path if stage.drop_path is not None else 0.0
    return Stage(
        model=stage.model, pretrained=pretrained,
        epochs=stage.epochs if stage.epochs is not None else epochs_of(train_cfg, pretrained, student),
        image_size=stage.image_size, batch_size=stage.batch_size or train_cfg.batch_size,
        lr=opt.pop('lr'), randaugment=None if randaugment == 'none' else randaugment,
        dropout=dropout, drop_path=drop_path, unlabeled_ratio=ratio, opt=opt, preset=preset)


class _Cycle:
    """Endless batches from a prepared loader, one pass after another, resumable by count."""

    def __init__(self, loader, seen: int = 0):
        self.loader = loader
        self.seen = seen
        self._it = None

    def _start(self):
        per_pass = len(self.loader)
        epoch, offset = divmod(self.seen, per_pass)
        self.loader.set_epoch(epoch)
        self.loader.dataset.set_epoch(epoch)
        loader = self.loader
        if offset:
            loader = skip_first_batches(self.loader, offset)
        self._it = iter(loader)

    def next(self):
        if self._it is None:
            self._start()
        try:
            batch = next(self._it)
        except StopIteration:
            self._start()
            batch = next(self._it)
        self.seen += 1
        if self.seen % len(self.loader) == 0:
            self._it = None
        return batch


def _checkpoint_dirs(root: Path):
    return sorted(root.glob('step-*'), key=lambda p: int(p.name.split('-')[1])) if root.is_dir() else []


def _save_checkpoint(accelerator, root: Path, state: Dict[str, Any], keep: int, ema) -> None:
    """Save the full training state atomically: a temp dir renamed once every process wrote."""
    name = f"step-{state['step']:08d}"
    final = root / name
    tmp = root / f'.{name}.tmp'
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # the EMA weights go in safetensors beside Accelerate's state, never pickled
            save_file(_contiguous(ema.state_dict()), str(tmp / 'ema.safetensors'))
            write_json_atomic(tmp / 'trainer_state.json', state)
            for f in tmp.iterdir():
                if f.is_file():
                    fsync_file(f)
            replace_dir(tmp, final)
            for old in _checkpoint_dirs(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError, SafetensorError, DiskFull) as e:
        # a full disk surfaces as OSError from Python, SafetensorError from safetensors and a
        # RuntimeError from torch.save (optimizer state); all mean this checkpoint was not written
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        code = e.code if isinstance(e, DiskFull) else full_disk_errno(e)
        if code is not None:  # the checkpoint is what needs the space, whichever of its files met the full disk
            raise DiskFull(final, code, _checkpoint_bytes(ema.module),
                           'rerun the same command (train: with --resume)') from e
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [''])[0]
        raise UserError(f'cannot write a checkpoint in {root} ({reason}; {_free_space(root)}); free space or fix '
                        'permissions, then run the same command again (train: with --resume): the last good '
                        'checkpoint is kept.') from e
    accelerator.wait_for_everyone()


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _checkpoint_bytes(model: torch.nn.Module) -> int:
    """A rough checkpoint size: the weights, their EMA and two optimizer moments (AdamW's; RMSProp keeps fewer)."""
    return 4 * _weight_bytes(model)


def _warn_if_short_of_space(output: Path, ckpt_root: Path, model: torch.nn.Module, keep: int) -> None:
    """Before a stage trains: do its checkpoints (``keep`` and the one being written) and its model fit?"""
    have = len(_checkpoint_dirs(ckpt_root))
    ckpt = _checkpoint_bytes(model)
    count = max(keep + 1 - have, 1)
    need = count * ckpt + _weight_bytes(model)
    warn_if_short_of_space(output, need, f'{count} checkpoint{"s" * (count > 1)} of about {mebibytes(ckpt)} '
                           'and the model')


def _free_space(path: Path) -> str:
    try:
        return f'{shutil.disk_usage(path).free / 2 ** 20:.0f} MiB free there'
    except OSError:
        return 'free space unknown'


def _contiguous(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in state.items()}


def _latest_checkpoint(root: Path) -> Optional[Path]:
    done = [d for d in _checkpoint_dirs(root) if (d / 'trainer_state.json').is_file()]
    return done[-1] if done else None


def _workers_machine(device: torch.device) -> str:
    return f'{device.type}, {os.cpu_count()} cpus, {process_state().num_processes} processes'


def _workers_at_start(ckpt_root: Path, device: torch.device) -> Optional[int]:
    """The data workers an unfinished stage measured when it started, from its newest readable checkpoint.

    Its resumption on the same kind of machine keeps them, and with them torch's thread count
    (``cpu_threads``), so it computes the floats an uninterrupted run would; measuring again could
    choose otherwise on a busier machine. Elsewhere (another device or core count) it measures.
    """
    for ckpt in reversed(_checkpoint_dirs(ckpt_root)):
        try:
            state = json.loads((ckpt / 'trainer_state.json').read_text())
            value, machine = state.get('num_workers'), state.get('workers_machine')
        except (OSError, ValueError, AttributeError):
            continue
        if machine != _workers_machine(device):
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def check_trackers(log_with: Any, key: str = '--log-with') -> None:
    """Accelerate's own tracker check (``filter_trackers``), up front and as one line: an unknown name, or a
    tracker whose package is missing (Accelerate would only drop it, and the run would log nothing)."""
    if not log_with:
        return
    from accelerate.tracking import filter_trackers
    from accelerate.utils import LoggerType

    names = list(log_with) if isinstance(log_with, (list, tuple)) else [log_with]
    try:
        kept = {getattr(t, 'value', t) for t in filter_trackers(names, logging_dir='.')}
    except ValueError:
        known = [t for t in LoggerType.list() if t != 'all']
        bad = next(n for n in names if isinstance(n, str) and n not in LoggerType.list())
        close = difflib.get_close_matches(bad, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ''
        raise UserError(f'{key}: unknown tracker {bad!r}; Accelerate knows {", ".join(known)}{hint}') from None
    missing = [n for n in names if isinstance(n, str) and n != 'all' and n not in kept]
    if missing:
        raise UserError(f'{key}: the tracker {missing[0]!r} needs its package; `pip install {missing[0]}`, '
                        'or drop the tracker.')


def _resume_from(accelerator, ema, root: Path, settings: Dict[str, Any]) -> Optional[Path]:
    """Load the newest checkpoint that reads whole; a damaged one is passed over with a one-line warning.

    A checkpoint made with other settings (``settings``: the model, data, batch, lr and noise a stage
    trains with; not its length, which a resume may extend) is refused with one line that names the first one that differs.
    """
    kept = [d for d in _checkpoint_dirs(root) if (d / 'trainer_state.json').is_file()]
    for n, ckpt in enumerate(reversed(kept)):
        try:
            state = json.loads((ckpt / 'trainer_state.json').read_text())
            int(state['step']), int(state['epoch'])
            made = state.get('settings')
        except Exception:  # noqa: BLE001 - damage is handled with the load below
            made = None
        changed = [k for k in settings if isinstance(made, dict) and k in made and made[k] != settings[k]]
        if changed:
            k = changed[0]
            raise UserError(f'the checkpoints in {root} were made with {k} {made[k]!r}, not {settings[k]!r}; '
                            'resume with the settings they were made with, or remove them to start this stage over.')
        try:
            state = json.loads((ckpt / 'trainer_state.json').read_text())
            int(state['step']), int(state['epoch'])
            accelerator.load_state(str(ckpt))
            # read on the CPU, copied to the EMA's own device by load_state_dict: safetensors refuses
            # the 'cpu:0' that several CPU processes have as their device
            ema.load_state_dict(load_file(str(ckpt / 'ema.safetensors'), device='cpu'))
            return ckpt
        except Exception as e:  # noqa: BLE001 - any damage means: try the one before
            older = kept[-n - 2] if n + 2 <= len(kept) else None
            if older is None:
                raise UserError(f'no checkpoint in {root} can be read ({ckpt.name}: {type(e).__name__}); remove '
                                f'{root} to start this stage over.') from e
            if accelerator.is_main_process:
                warnings.warn(f'checkpoint {ckpt} cannot be read ({type(e).__name__}); resuming from the one '
                              f'before it, {older.name}.', stacklevel=2)
    return None


def default_ema_decay(total_steps: int) -> float:
    """An EMA horizon of about a tenth of the run: 0.9999 at ImageNet scale, less for short runs."""
    return float(min(0.9999, max(0.9, 1.0 - 10.0 / max(total_steps, 1))))


@torch.inference_mode()
def evaluate(model, loader, accelerator, num_classes: int) -> Dict[str, float]:
    """Top-1/top-5 (percent) and loss over a prepared loader; gather_for_metrics drops padding."""
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    count = skipped = 0
    k = min(5, num_classes)
    for batch in loader:
        skipped += len(batch.skipped)
        if batch.pixel_values.numel() == 0:
            continue
        x = batch.pixel_values.to(accelerator.device)
        y = batch.label.to(accelerator.device)
        with accelerator.autocast():
            logits = model(x)
        logits, y = accelerator.gather_for_metrics((logits.float(), y))
        top = logits.topk(k, dim=-1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=-1).sum().item()
        loss_sum += F.cross_entropy(logits, y, reduction='sum').item()
        count += y.numel()
    if count == 0:
        raise UserError('no evaluation image could be decoded.')
    return {'top1': 100.0 * correct1 / count, 'top5': 100.0 * correct5 / count,
            'loss': loss_sum / count, 'images': count, 'skipped': skipped}


def train(
        stage: ModelStage,
        labeled: SourceLike,
        output: os.PathLike,
        *,
        eval_data: Optional[SourceLike] = None,
        pseudo: Optional[os.PathLike] = None,
        unlabeled: Optional[SourceLike] = None,
        train_cfg: Optional[TrainConfig] = None,
        noise: Optional[NoiseConfig] = None,
        seed: int = 0,
        resume: bool = False,
        progress: bool = True,
        freeze_blocks: int = 0,
        unaugmented: bool = False,
        allow_pickle: bool = False,
        init_from: Optional[os.PathLike] = None,
) -> Dict[str, Any]:
    """Train a teacher (no ``pseudo``) or a noised student, evaluate its EMA, export it.

    ``unaugmented`` trains on the eval transform (the paper's last fine-tune at test resolution).
    ``allow_pickle`` lets a starting model directory hold pickled weights (see ``models.load_model``).
    ``init_from`` is a model directory of the same architecture whose weights the model starts from
    (a student warm-started from its teacher).
    Writes ``OUTPUT/model/`` (plain-timm export), ``metrics.json``, ``metrics.jsonl`` and
    ``checkpoints/``. Returns the final metrics.
    """
    with output_lock(output, process_state()):  # one process writes an output directory
        return _train(stage, labeled, output, eval_data=eval_data, pseudo=pseudo, unlabeled=unlabeled,
                      train_cfg=train_cfg, noise=noise, seed=seed, resume=resume, progress=progress,
                      freeze_blocks=freeze_blocks, unaugmented=unaugmented, allow_pickle=allow_pickle,
                      init_from=init_from)


def _train(stage, labeled, output, *, eval_data, pseudo, unlabeled, train_cfg, noise, seed, resume, progress,
           freeze_blocks, unaugmented, allow_pickle, init_from) -> Dict[str, Any]:
    """``train`` itself, while it holds the output directory's lock: setup, the loop, the export."""
    train_cfg = train_cfg or TrainConfig()
    student = pseudo is not None
    spec = resolve_stage(stage, train_cfg, noise or NoiseConfig(), student)
    check_trackers(train_cfg.log_with)
    output = Path(output)
    accelerator = make_accelerator(
        resolve_precision(train_cfg.mixed_precision, 'train'), seed=seed,
        gradient_accumulation_steps=train_cfg.grad_accum_steps,
        log_with=train_cfg.log_with, project_dir=str(output))
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
    set_seed(seed)

    labeled_ds, image_col, label_col, label_names, num_classes = labeled_set(labeled)
    # a new head when the class count differs from the source's
    checkpoint = Path(init_from) / 'model.safetensors' if init_from is not None else None
    model = load_model(spec.model, pretrained=spec.pretrained and checkpoint is None, num_classes=num_classes,
                       drop_rate=spec.dropout, drop_path_rate=spec.drop_path, allow_pickle=allow_pickle,
                       checkpoint=checkpoint)
    # a head no weights were loaded into starts at zero (see models.zero_new_head)
    new_head = zero_new_head(model, spec.model, spec.pretrained, checkpoint)
    if spec.lr is None:
        spec = replace(spec, lr=small_data_lr(classifier_width(model)))
    label_names = label_names or model_label_names(model)
    data_config = data_config_of(model, spec.image_size)
    small = small_input_warning(model, spec.model, data_config['input_size'][-1])
    if small and accelerator.is_main_process and not unaugmented:
        warnings.warn(small, stacklevel=2)
    _freeze_early_blocks(model, freeze_blocks)
    # exact, and only where it was measured faster (see models.small_map_depthwise_pays)
    cropped = crop_small_map_depthwise(model) if small_map_depthwise_pays(accelerator.device) else 0

    rows = train_rows(labeled_ds, image_col, label_col, num_classes, data_config, spec.batch_size, seed,
                      pseudo=pseudo, unlabeled=unlabeled, randaugment=spec.randaugment,
                      unlabeled_ratio=spec.unlabeled_ratio, unaugmented=unaugmented)
    # measured when the stage starts; a resumed stage keeps what its start measured
    resumed_workers = (_workers_at_start(output / 'checkpoints', accelerator.device)
                       if resume and train_cfg.num_workers is None else None)
    num_workers = resumed_workers if resumed_workers is not None else choose_workers(
        train_cfg.num_workers, rows.main, model, data_config['input_size'], accelerator.device, train=True,
        batch_size=rows.images_per_step)
    # chosen workers on CPU: a short pass loads in the process (see data.MIN_WORKER_PASS)
    short = train_cfg.num_workers is None and accelerator.device.type == 'cpu'
    main_loader, side_loader = train_loaders(rows, num_workers, short_pass_in_process=short)
    eval_batches = None if eval_data is None else eval_loader(
        eval_data, data_config, train_cfg.eval_batch_size or 2 * spec.batch_size, num_workers, num_classes,
        short_pass_in_process=short)
    workers = {'num_workers': main_loader.num_workers,
               'labeled_workers': side_loader.num_workers if side_loader is not None else None}

    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, spec, accelerator.device)
    if train_cfg.compile:
        model = torch.compile(model)
    model, optimizer, main_loader = accelerator.prepare(model, optimizer, main_loader)
    side_loader = accelerator.prepare(side_loader) if side_loader is not None else None
    eval_batches = accelerator.prepare(eval_batches) if eval_batches is not None else None
    run = _Run(accelerator, model, optimizer, main_loader, side_loader, eval_batches, spec, train_cfg, rows,
               num_classes, output, progress)
    run.restore(resume)
    if accelerator.is_main_process and run.state['step'] < run.total_steps:
        _warn_if_short_of_space(output, run.ckpt_root, accelerator.unwrap_model(model), train_cfg.keep_checkpoints)
        _announce(run, spec, train_cfg, rows.images_per_step, student,
                  'no' if accelerator.mixed_precision == 'no' else accelerator.mixed_precision)
    # checkpointed with the step, for a resumption
    run.state.update(num_workers=num_workers, workers_machine=_workers_machine(accelerator.device))
    run.loop(max(w or 0 for w in workers.values()))

    final = {**run.summary(), **workers, 'labeled_images': len(rows.labeled),
             'pseudo_images': rows.pseudo_rows, 'model': spec.model, 'num_classes': num_classes,
             'image_size': data_config['input_size'][-1],
             'noise': {'randaugment': spec.randaugment, 'dropout': spec.dropout, 'drop_path': spec.drop_path,
                       'unlabeled_ratio': spec.unlabeled_ratio,
                       # fewer pseudo rows than ratio x labeled rows shrink the pseudo share (data.pseudo_batch_size)
                       'pseudo_batch_size': rows.main_batch} if student else None,
             'ema_decay': run.ema_decay, 'clip_grad': clip_grad_of(train_cfg, spec.pretrained), 'lr': spec.lr,
             'preset': spec.preset, 'pretrained': spec.pretrained, 'weight_decay': spec.opt.get('weight_decay'),
             'warmup_epochs': run.warmup_epochs, 'min_steps': min_steps_of(train_cfg, spec.pretrained),
             'batch_size': spec.batch_size, 'cropped_depthwise': cropped,
             'head': 'zeros' if new_head else 'loaded',
             'eval': source_record(eval_data)}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(run.ema.module, output / 'model', label_names=label_names, data_config=data_config)
        write_json_atomic(output / 'metrics.json', final)
    accelerator.wait_for_everyone()
    if train_cfg.log_with:
        accelerator.end_training()
    return final


def schedule(steps_per_epoch: int, spec: Stage, train_cfg: TrainConfig, images_per_step: int) -> Tuple[int, int]:
    """A stage's (epochs, steps). Short epochs (a small labeled set) repeat until the stage has seen
    its minimum of images, min_steps batches of batch_size: a student step of B labeled and ratio x B
    pseudo-labeled images counts 1 + ratio."""
    min_batches = math.ceil(min_steps_of(train_cfg, spec.pretrained) * spec.batch_size / images_per_step)
    epochs = max(spec.epochs, math.ceil(min_batches / steps_per_epoch)) if min_batches else spec.epochs
    steps = steps_per_epoch * epochs
    return epochs, min(steps, train_cfg.max_steps) if train_cfg.max_steps else steps


def schedule_note(steps_per_epoch: int, spec: Stage, train_cfg: TrainConfig, images_per_step: int) -> str:
    """How a stage's steps follow from its epochs, min_steps and max_steps, in words."""
    epochs, steps = schedule(steps_per_epoch, spec, train_cfg, images_per_step)
    note = f'{spec.epochs} epochs of {steps_per_epoch} steps'
    if epochs > spec.epochs:
        note += (f', repeated to {epochs} because train.min_steps is {min_steps_of(train_cfg, spec.pretrained)}'
                 ' (--min-steps 0 turns it off)')
    if train_cfg.max_steps and steps < steps_per_epoch * epochs:
        note += f', cut at train.max_steps {train_cfg.max_steps}'
    return note


@functools.lru_cache(maxsize=32)  # a run's plan and its stages' announcements measure each shape once
def seconds_per_step(model: str, image_size: Optional[int], images: int, precision: str, channels_last: bool,
                     repeats: int = 2) -> Optional[float]:
    """A training step's compute time for ``images`` inputs, measured on random weights and inputs.

    Data loading is not counted. None when the architecture is not known without a download.
    """
    import timm
    arch = architecture_of(model)
    if arch is None or not timm.is_model(arch):
        return None
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    with torch.random.fork_rng(devices=[]):  # the run's random stream stays as if nothing was measured
        return _timed_steps(arch, device, image_size, images, precision, channels_last, repeats)


def _timed_steps(arch: str, device: torch.device, image_size: Optional[int], images: int, precision: str,
                 channels_last: bool, repeats: int) -> float:
    import timm
    net = timm.create_model(arch, pretrained=False, num_classes=10)
    size = image_size or data_config_of(net)['input_size'][-1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(device, memory_format=fmt).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(images, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (images,), device=device)
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision)
    times = []
    for _ in range(repeats + 1):  # the first step warms up the allocator and the kernels
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(net(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return 'unknown'
    if seconds < 90:
        return f'{seconds:.0f} s'
    return f'{seconds / 60:.0f} min' if seconds < 5400 else f'{seconds / 3600:.1f} h'


def _announce(run, spec: Stage, train_cfg: TrainConfig, images_per_step: int, student: bool, precision: str) -> None:
    """One line before a stage trains: its steps, where they come from, and how long they should take."""
    left = run.total_steps - run.state['step']
    per_step = seconds_per_step(spec.model, spec.image_size, images_per_step, precision, train_cfg.channels_last)
    took = f'about {duration(left * per_step)} ({per_step:.2f} s a step, measured; data loading adds to it)' \
        if per_step is not None else 'duration unknown'
    done = f', {run.state["step"]} done' if run.state['step'] else ''
    print(f"{'student' if student else 'teacher'} {spec.model}: {run.total_steps} steps of {images_per_step} images "
          f"({schedule_note(run.steps_per_epoch, spec, train_cfg, images_per_step)}{done}), preset {spec.preset}, "
          f'lr {spec.lr:g}; {took}', flush=True)


# torch's Adam/AdamW in one fused kernel (CPU and CUDA): B0 at 32 px, batch 64, 2 cores, a step of
# the optimizer 10.0 -> 2.8 ms, against 91 ms for the forward+backward
FUSED_OPTS = ('adam', 'adamw')


def _optimizer(model: torch.nn.Module, spec: Stage, device: torch.device):
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt_kwargs = {k: v for k, v in spec.opt.items() if k in ('opt', 'weight_decay', 'momentum')}
    if opt_kwargs['opt'].lower() in FUSED_OPTS and device.type in ('cpu', 'cuda'):
        opt_kwargs['fused'] = True
    params = model if len(trainable) == len(list(model.parameters())) else trainable
    return create_optimizer_v2(params, lr=spec.lr, **opt_kwargs)


# at an epoch end a checkpoint is written once this many steps passed since the last one (or at
# the stage's last step, or on a stop signal): 100 labeled digits at batch 64 make one-step epochs,
# and a checkpoint a step costs more than the tiny model's step
EPOCH_CHECKPOINT_MIN_STEPS = 100


class _Run:
    """One stage's training state: schedule, EMA, checkpoints, and the loop over steps."""

    def __init__(self, accelerator, model, optimizer, main_loader, side_loader, eval_loader, spec: Stage,
                 train_cfg: TrainConfig, rows, num_classes: int, output: Path, progress: bool):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.main_loader, self.side_loader, self.eval_loader = main_loader, side_loader, eval_loader
        self.spec, self.cfg, self.hard, self.num_classes = spec, train_cfg, rows.hard, num_classes
        self.normalize = rows.normalize
        # the pseudo-labeled mean weighs as many labeled means as there are pseudo images per labeled one
        self.pseudo_weight = rows.main_batch / rows.side_batch if rows.side_batch else 0.0
        self.output, self.progress, self.ckpt_root = output, progress, output / 'checkpoints'
        self.steps_per_epoch = len(main_loader)
        updates_per_epoch = math.ceil(self.steps_per_epoch / train_cfg.grad_accum_steps)
        self.epochs, self.total_steps = schedule(self.steps_per_epoch, spec, train_cfg, rows.images_per_step)
        sched_kwargs = {k: spec.opt[k] for k in ('decay_epochs', 'decay_rate') if k in spec.opt}
        # warmup never takes more than a tenth of a short run
        warmup = self.warmup_epochs = min(float(spec.opt.get('warmup_epochs', 0)), 0.1 * self.epochs)
        self.scheduler, _ = create_scheduler_v2(
            optimizer, sched=spec.opt['sched'], num_epochs=self.epochs, warmup_epochs=warmup,
            min_lr=spec.opt.get('min_lr', 0.0), warmup_lr=spec.lr * 0.01, step_on_epochs=False,
            updates_per_epoch=updates_per_epoch, **sched_kwargs)
        self.ema_decay = train_cfg.ema_decay or default_ema_decay(
            math.ceil(self.total_steps / train_cfg.grad_accum_steps))
        self.ema = ModelEmaV3(accelerator.unwrap_model(model), decay=self.ema_decay,
                              use_warmup=train_cfg.ema_warmup, device=accelerator.device)
        # what the checkpoints are made with, so that a resume with other settings is refused
        self.settings = {'model': spec.model, 'num_classes': num_classes, 'batch_size': spec.batch_size,
                         'images_per_step': rows.images_per_step, 'lr': spec.lr,
                         'preset': spec.preset, 'weight_decay': spec.opt.get('weight_decay'),
                         'randaugment': spec.randaugment, 'dropout': spec.dropout, 'drop_path': spec.drop_path}
        self.state = {'step': 0, 'epoch': 0, 'step_in_epoch': 0, 'updates': 0, 'side_seen': 0, 'images': 0,
                      'seconds': 0.0, 'settings': self.settings}
        self.metrics: Dict[str, Any] = {}
        self.soft_ce = SoftTargetCrossEntropy()

    def restore(self, resume: bool) -> None:
        """Resume from the newest readable checkpoint, refuse to restart over an unfinished one, or start clean."""
        accelerator, output, ckpt_root = self.accelerator, self.output, self.ckpt_root
        if resume:
            last = _resume_from(accelerator, self.ema, ckpt_root, self.settings)
            if last is not None:
                self.state = {'settings': self.settings, **json.loads((last / 'trainer_state.json').read_text())}
                accelerator.print(f'resuming from {last} (epoch {self.state["epoch"]}, step {self.state["step"]})')
                if accelerator.is_main_process:
                    keep_jsonl_until(output / 'metrics.jsonl', self.state['step'])
        elif _latest_checkpoint(ckpt_root) is not None and not (output / 'metrics.json').is_file():
            raise UserError(f'{output} holds the checkpoints of an unfinished training; pass --resume to continue '
                            f'it, or remove {ckpt_root} (or choose another --output) to start over.')
        elif accelerator.is_main_process:
            # a fresh start must not mix with an older run's history
            shutil.rmtree(ckpt_root, ignore_errors=True)
            for name in ('metrics.jsonl', 'metrics.json'):
                (output / name).unlink(missing_ok=True)
        accelerator.wait_for_everyone()
        if self.cfg.log_with:
            accelerator.init_trackers(output.name, config={
                'model': self.spec.model, 'epochs': self.epochs, 'lr': self.spec.lr,
                'batch_size': self.spec.batch_size, 'student': self.side_loader is not None})

    def _loss(self, batch, side):
        """One step's loss: CE on the labeled images, plus ratio x (soft) CE on the pseudo-labeled ones."""
        accelerator, cfg = self.accelerator, self.cfg
        x, y = batch.pixel_values, batch.label
        n_main = x.shape[0]
        if side is not None:
            lb = side.next()
            x = torch.cat([lb.pixel_values, x]) if n_main else lb.pixel_values
            n_lab = lb.pixel_values.shape[0]
        x = x.to(accelerator.device, non_blocking=True)
        if x.dtype == torch.uint8 and self.normalize is not None:
            x = self.normalize(x)  # uint8 over the wire, to the device; the float model input from here
        x = x.contiguous(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        with accelerator.autocast():
            logits = self.model(x).float()
        if side is None:
            return F.cross_entropy(logits, y.to(accelerator.device), label_smoothing=cfg.label_smoothing), x.shape[0]
        loss = F.cross_entropy(logits[:n_lab], lb.label.to(accelerator.device), label_smoothing=cfg.label_smoothing)
        if n_main:
            target = y.to(accelerator.device)
            u = (F.cross_entropy(logits[n_lab:], target, label_smoothing=cfg.label_smoothing)
                 if self.hard else self.soft_ce(logits[n_lab:], target))
            loss = loss + self.pseudo_weight * u
        return loss, x.shape[0]

    def loop(self, num_workers: int) -> None:
        accelerator, state, cfg = self.accelerator, self.state, self.cfg
        model, optimizer, main_loader = self.model, self.optimizer, self.main_loader
        side = _Cycle(self.side_loader, state['side_seen']) if self.side_loader is not None else None
        clip = clip_grad_of(cfg, self.spec.pretrained)
        bar = progress_bar(total=self.total_steps, initial=state['step'],
                           disable=not (self.progress and accelerator.is_main_process),
                           desc=f"{'student' if side is not None else 'teacher'} {self.spec.model}")
        t_start = time.perf_counter() - state['seconds']
        window_t, window_imgs = time.perf_counter(), 0
        saved_at = state['step']
        with StopFlag() as stop, bar, torch_threads(cpu_threads(num_workers, accelerator.device)):
            # the bar is cleared however the loop ends; the thread count is restored too
            while state['step'] < self.total_steps:
                epoch = state['epoch']
                main_loader.set_epoch(epoch)
                main_loader.dataset.set_epoch(epoch)
                loader = main_loader
                if state['step_in_epoch']:
                    loader = skip_first_batches(main_loader, state['step_in_epoch'])
                model.train()
                for batch in loader:
                    with accelerator.accumulate(model):
                        loss, n_images = self._loss(batch, side)
                        accelerator.backward(loss)
                        if clip and accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(model.parameters(), clip)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    if accelerator.sync_gradients:
                        state['updates'] += 1
                        self.scheduler.step_update(state['updates'])
                        self.ema.update(accelerator.unwrap_model(model), step=state['updates'])
                    state['step'] += 1
                    state['step_in_epoch'] += 1
                    state['side_seen'] = side.seen if side is not None else 0
                    images = n_images * accelerator.num_processes
                    state['images'] += images
                    window_imgs += images
                    lr = optimizer.param_groups[0]['lr']
                    if bar.n % 5 == 0 or state['step'] == self.total_steps:
                        if not math.isfinite(loss.item()):  # a NaN stays: checking every few steps finds it
                            raise UserError(
                                f"the training loss is not finite at step {state['step']} (lr {lr:.2e}); the "
                                'pseudo labels, the data or a too high lr make it so: check them, or lower the lr, '
                                'then run the command again.')
                        now = time.perf_counter()
                        bar.set_postfix(loss=f'{loss.item():.3f}', lr=f'{lr:.2e}',
                                        img_s=f'{window_imgs / max(now - window_t, 1e-9):.1f}')
                        window_t, window_imgs = now, 0
                    bar.update(1)
                    if cfg.log_with:
                        accelerator.log({'train/loss': loss.item(), 'train/lr': lr}, step=state['step'])
                    epoch_done = state['step_in_epoch'] >= self.steps_per_epoch
                    if epoch_done:
                        state['epoch'] += 1
                        state['step_in_epoch'] = 0
                    state['seconds'] = time.perf_counter() - t_start
                    every = cfg.checkpoint_every
                    # a stop at an epoch's last step waits for the epoch's evaluation and checkpoint below
                    stop_signal = _stop_requested(accelerator, stop)
                    stop_now = stop_signal is not None and not epoch_done
                    if stop_now or (every and state['step'] % every == 0 and not epoch_done):
                        _save_checkpoint(accelerator, self.ckpt_root, state, cfg.keep_checkpoints, self.ema)
                        saved_at = state['step']
                        if stop_now:
                            raise _preempted(stop_signal, state, self.ckpt_root)
                    if epoch_done or state['step'] >= self.total_steps:
                        break
                last = state['step'] >= self.total_steps
                self.metrics = _end_of_epoch(accelerator, self.ema, self.eval_loader, self.num_classes, state,
                                             self.output, loss, cfg, eval_every=max(1, math.ceil(self.epochs / 10)),
                                             last=last)
                stop_signal = _stop_requested(accelerator, stop)  # also one that came during the evaluation
                # short epochs (a small labeled set) would write a checkpoint every step or two
                if last or stop_signal is not None or state['step'] - saved_at >= EPOCH_CHECKPOINT_MIN_STEPS:
                    _save_checkpoint(accelerator, self.ckpt_root, state, cfg.keep_checkpoints, self.ema)
                    saved_at = state['step']
                    # one that came during the write: at the stage's last step no later check would see it
                    stop_signal = stop_signal or _stop_requested(accelerator, stop)
                if stop_signal is not None:
                    raise _preempted(stop_signal, state, self.ckpt_root)
        bar.close()

    def summary(self) -> Dict[str, Any]:
        metrics, state = self.metrics, self.state
        if not metrics and self.eval_loader is not None:  # resumed after the last step
            metrics = evaluate(self.ema.module, self.eval_loader, self.accelerator, self.num_classes)
        return {'top1': metrics.get('top1'), 'top5': metrics.get('top5'), 'loss': metrics.get('loss'),
                'epoch': state['epoch'], 'epochs': self.epochs, 'step': state['step'],
                'images_seen': state['images'], 'seconds': round(state['seconds'], 2),
                'img_per_s': round(state['images'] / max(state['seconds'], 1e-9), 2)}


def _end_of_epoch(accelerator, ema, eval_loader, num_classes, state, output, loss, train_cfg,
                  eval_every: int, last: bool) -> Dict[str, Any]:
    metrics: Dict[str, Any] = {}
    # about ten evaluations per stage: on small data one eval costs more than an epoch
    if eval_loader is not None and (last or state['epoch'] % eval_every == 0):
        metrics = evaluate(ema.module, eval_loader, accelerator, num_classes)
    line = {'epoch': state['epoch'], 'step': state['step'], 'train_loss': round(loss.item(), 5),
            **{k: metrics[k] for k in ('top1', 'top5', 'loss') if k in metrics},
            'seconds': round(state['seconds'], 2)}
    if accelerator.is_main_process:
        append_jsonl(output / 'metrics.jsonl', line)
    if train_cfg.log_with and metrics:
        accelerator.log({f'eval/{k}': metrics[k] for k in ('top1', 'top5', 'loss')}, step=state['step'])
    return metrics


def _freeze_early_blocks(model, n_blocks: int) -> None:
    """Freeze the stem and the first ``n_blocks`` stages (the paper's last fine-tune step)."""
    if n_blocks <= 0:
        return
    for name, module in model.named_children():
        if name in ('conv_stem', 'bn1'):
            module.requires_grad_(False)
    blocks = getattr(model, 'blocks', [])
    if n_blocks > len(blocks):
        raise UserError(f'--freeze-blocks {n_blocks} is more than the {len(blocks)} blocks of this model; '
                        f'use 0 to {len(blocks)}.')
    for block in list(blocks)[:n_blocks]:
        block.requires_grad_(False)


def evaluate_model(
        model_spec: str,
        data: SourceLike,
        batch_size: int = 64,
        image_size: Optional[int] = None,
        mixed_precision: str = 'auto',
        num_workers: Optional[int] = None,
        allow_pickle: bool = False,
) -> Dict[str, Any]:
    """Top-1/top-5 of a model (name, hf-hub: id or directory) on a labeled split."""
    accelerator = make_accelerator(resolve_precision(mixed_precision, 'inference'))
    model = load_model(model_spec, allow_pickle=allow_pickle)
    data_config = data_config_of(model, image_size)
    workers = num_workers_for(num_workers, data_config['input_size'][-1], accelerator.device)
    loader = eval_loader(data, data_config, batch_size, workers, model.num_classes)
    model = model.to(memory_format=torch.channels_last)
    model, loader = accelerator.prepare(model, loader)
    with torch_threads(cpu_threads(workers, accelerator.device)):
        return evaluate(model, loader, accelerator, accelerator.unwrap_model(model).num_classes)
