"""The run directory's format, in one place: stage names, DONE markers, stage.json, final/, and
finding the model behind a run, stage or model directory.

    RUN/config.yaml  summary.json  summary.md  accuracy.png  sources/  final/
    RUN/iter0-teacher/  iterK-labels/  iterK-student/  finetune/
        each with stage.json (the config hash that made it) and DONE (written last)
"""
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from .config import RunConfig, UserError
from .files import LOCK_NAME, write_json_atomic
from .models import is_model_dir, pickled_weights
from .runtime import process_state


STAGE_NAME = re.compile(r'^iter(\d+)-(teacher|student|labels)$')
FINETUNE = 'finetune'


def stage_names(cfg: RunConfig) -> List[str]:
    names = ['iter0-teacher']
    for k in range(1, len(cfg.students) + 1):
        names += [f'iter{k}-labels', f'iter{k}-student']
    if cfg.finetune.epochs > 0:
        names.append('finetune')
    return names


def is_done(stage_dir: Path) -> bool:
    return (stage_dir / 'DONE').is_file()


def mark_done(stage_dir: Path, record: Dict[str, Any]) -> None:
    write_json_atomic(stage_dir / 'DONE', record)


def missing_output(stage_dir: Path) -> Optional[str]:
    """What a finished stage lacks of its outputs (or holds damaged), or None."""
    if stage_kind(stage_dir.name) == 'labels':
        needed = ['stats.json']
        if not any((stage_dir / 'data').glob('*.parquet')):
            return f'{stage_dir / "data"} holds no parquet file'
    else:
        needed = ['metrics.json', 'model/config.json', 'model/model.safetensors']
    for rel in needed:
        f = stage_dir / rel
        if not f.is_file():
            return f'{f} is missing'
        if f.suffix == '.json':
            try:
                json.loads(f.read_text())
            except (ValueError, UnicodeDecodeError):
                return f'{f} is not valid JSON'
    return None


UNREADABLE = object()


def recorded_hash(stage_dir: Path):
    """The config hash a stage recorded, None when it has none, ``UNREADABLE`` for a damaged stage.json."""
    f = stage_dir / 'stage.json'
    if not f.is_file():
        return None
    try:
        recorded = json.loads(f.read_text())
        return str(recorded['config_hash'])
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        return UNREADABLE


# every writer here and below uses a hidden temp name: .NAME.tmp, .NAME.tmp-PID, .NAME.old-PID, ...
LEFTOVER = re.compile(r'^\.(?P<name>.+)\.(tmp|old)([-.][^/]*)?$')

# what a run writes at its top level, besides its stage directories
RUN_FILES = ('config.yaml', 'summary.json', 'summary.md', 'accuracy.png', 'sources', 'final',
             LOCK_NAME, LOCK_NAME + '.pid')


def _is_run_entry(name: str) -> bool:
    return name in RUN_FILES or name == FINETUNE or STAGE_NAME.match(name) is not None


def _is_own_leftover(name: str) -> bool:
    match = LEFTOVER.match(name)
    return match is not None and _is_run_entry(match.group('name'))


def foreign_entries(out: Path) -> List[str]:
    """What in an existing output directory a run did not write: empty for a new, empty or run directory.

    A run directory holds nothing but what a run writes, and the lock every run takes first or a
    stage that recorded what made it (a stage copied from another run), so that a folder with only
    the user's own config.yaml is not taken for one.
    """
    if not out.is_dir():
        return []
    names = sorted(p.name for p in out.iterdir())
    made = LOCK_NAME in names or any((out / n / 'stage.json').is_file() for n in names if STAGE_NAME.match(n))
    if names and not made:
        return names
    return [n for n in names if not (_is_run_entry(n) or _is_own_leftover(n))]


def check_run_output(out: Path) -> None:
    """Refuse an output that is a file, or a non-empty directory that is not a run: a run writes and cleans there."""
    if out.exists() and not out.is_dir():
        raise UserError(f'the output {out} is a file; pass a new or empty directory, or an earlier run directory.')
    foreign = foreign_entries(out)
    if foreign:
        shown = ', '.join(foreign[:3]) + (f' and {len(foreign) - 3} more' if len(foreign) > 3 else '')
        raise UserError(f'the output {out} is not empty and is not a noisystudent run (it holds {shown}); '
                        'pass a new or empty directory.')


def remove_leftovers(out: Path) -> None:
    """Temp files and directories that a killed run left behind: only the run's own, only in a run directory."""
    if foreign_entries(out):
        raise UserError(f'{out} is not a run directory; nothing is removed from it.')
    for entry in out.iterdir():
        if _is_own_leftover(entry.name):
            _remove(entry)
        elif entry.is_dir() and not entry.is_symlink() and _is_run_entry(entry.name):
            for root, dirs, files in os.walk(entry):
                for name in [n for n in dirs + files if LEFTOVER.match(n)]:
                    _remove(Path(root) / name)
                dirs[:] = [d for d in dirs if not LEFTOVER.match(d)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def start_stage(stage_dir: Path, config_hash_: str) -> None:
    if process_state().is_main_process:
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(stage_dir / 'stage.json', {'config_hash': config_hash_})
    process_state().wait_for_everyone()


@dataclass(frozen=True)
class ModelSource:
    """An exportable model and the run context around it (each part may be missing).

    ``stage_dir`` holds the stage's ``metrics.json``; ``stage`` is its name in the run
    (``iter2-student``), ``run_dir`` the run directory.
    """
    model_dir: Path
    stage_dir: Optional[Path] = None
    run_dir: Optional[Path] = None
    stage: Optional[str] = None


def is_run_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    if (path / 'summary.json').is_file():
        return True
    return (path / 'config.yaml').is_file() and any(
        STAGE_NAME.match(p.name) or p.name in (FINETUNE, 'final') for p in path.iterdir() if p.is_dir())


def check_exportable(path: Path, allow_pickle: bool = False) -> None:
    if not (path / 'config.json').is_file():
        raise UserError(f'{path} has no config.json; pass a model directory, a run stage directory '
                        'or a run directory.')
    if not (path / 'model.safetensors').is_file():
        if pickled_weights(path) is not None and not allow_pickle:
            raise UserError(f'{path} holds only pickled weights, which are loaded only with --allow-pickle '
                            '(tensors only, weights_only=True); `noisystudent export --allow-pickle` '
                            'converts them to model.safetensors.')
        if pickled_weights(path) is None:
            raise UserError(f'{path} has config.json but no model.safetensors; export the model again.')


def resolve_source(src: Union[str, os.PathLike, ModelSource], allow_pickle: bool = False) -> ModelSource:
    """The model behind ``src``: a model directory, a run stage directory, or a run directory.

    A run directory means its final student: the last finished stage (fine-tune, then the last
    ``iterK-student``, then the teacher of a teacher-only run), else ``final/``. A model directory
    with only pickled weights is refused unless ``allow_pickle``.
    """
    if isinstance(src, ModelSource):
        return src
    path = Path(src).expanduser()
    if not path.exists():
        raise UserError(f'{src} does not exist; pass a model directory, a run stage directory or a run directory.')
    if is_run_dir(path):
        # final/ is an export of the last finished stage; the stage itself is never stale
        stage = final_stage(path)
        if stage is not None:
            source = ModelSource(path / stage / 'model', path / stage, path, stage)
        elif is_model_dir(path / 'final'):
            source = ModelSource(path / 'final', None, path, None)
        else:
            raise UserError(f'run {path} has no finished stage yet; wait for it, or export a stage directory.')
    elif is_model_dir(path / 'model'):
        run = path.parent if is_run_dir(path.parent) else None
        source = ModelSource(path / 'model', path, run, path.name if run else None)
    elif path.name == 'final' and is_run_dir(path.parent):
        stage = final_stage(path.parent)
        source = ModelSource(path, path.parent / stage if stage else None, path.parent, stage)
    elif path.name == 'model' and (path.parent / 'metrics.json').is_file():
        run = path.parent.parent if is_run_dir(path.parent.parent) else None
        source = ModelSource(path, path.parent, run, path.parent.name if run else None)
    else:
        stages = model_stages(path) if path.is_dir() and not (path / 'config.json').exists() else []
        if stages:  # a run's stage folders without its config.yaml: not a run the tool wrote whole
            raise UserError(f'{src} holds run stages ({", ".join(stages)}) but no config.yaml, so it is not a run '
                            f'directory; export one of its stage directories, such as {path / stages[-1]}.')
        source = ModelSource(path)
    check_exportable(source.model_dir, allow_pickle)
    return source


def stage_order(name: str) -> Tuple[int, int]:
    match = STAGE_NAME.match(name)
    if match:
        return int(match.group(1)), 0
    return (1 << 30, 1) if name == FINETUNE else (-1, 0)


def stage_kind(name: str) -> Optional[str]:
    """'teacher', 'student', 'labels' or 'finetune' for a stage name of a run; None for anything else."""
    if name == FINETUNE:
        return 'finetune'
    match = STAGE_NAME.match(name)
    return match.group(2) if match else None


def is_model_stage(name: str) -> bool:
    return stage_kind(name) in ('teacher', 'student', 'finetune')


def model_stages(run: Path) -> List[str]:
    """Names of the run's model stages on disk (not label stages), in run order."""
    return sorted((p.name for p in run.iterdir() if p.is_dir() and is_model_stage(p.name)), key=stage_order)


def final_stage(run: Path) -> Optional[str]:
    """The stage the run chose for final/ (summary.json), else its last finished model stage."""
    summary = read_json(run / 'summary.json')
    chosen = summary.get('final_stage') if isinstance(summary, dict) else None
    if isinstance(chosen, str) and is_model_stage(chosen) and (run / chosen / 'DONE').exists() \
            and is_model_dir(run / chosen / 'model'):
        return chosen
    for name in reversed(model_stages(run)):
        if (run / name / 'DONE').exists() and is_model_dir(run / name / 'model'):
            return name
    return None


def read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return None


def run_summary(run: Optional[Path]) -> List[Dict[str, Any]]:
    data = read_json(run / 'summary.json') if run else None
    stages = data.get('stages') if isinstance(data, dict) else None
    return [s for s in stages if isinstance(s, dict)] if isinstance(stages, list) else []


def run_config(run: Optional[Path]) -> Dict[str, Any]:
    if run is None:
        return {}
    try:
        data = yaml.safe_load((run / 'config.yaml').read_text(encoding='utf-8'))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def labels_dir_of(source: ModelSource) -> Optional[Path]:
    """The pseudo-label directory the stage's student learned from."""
    if source.run_dir is None or source.stage is None:
        return None
    match = STAGE_NAME.match(source.stage)
    if match and match.group(2) == 'student':
        candidates = [source.run_dir / f'iter{match.group(1)}-labels']
    elif source.stage == FINETUNE:
        candidates = sorted((p for p in source.run_dir.iterdir() if p.is_dir() and stage_kind(p.name) == 'labels'),
                            key=stage_order, reverse=True)
    else:
        return None
    return next((c for c in candidates if (c / 'stats.json').is_file()), None)


def labels_files(labels_dir: Path) -> Tuple[Dict[str, Any], List[Path]]:
    """A pseudo-label directory's stats.json and selected shards (data/*.parquet), or a one-line error."""
    labels_dir = Path(labels_dir)
    stats = read_json(labels_dir / 'stats.json') if labels_dir.is_dir() else None
    files = sorted((labels_dir / 'data').glob('*.parquet')) if labels_dir.is_dir() else []
    if not isinstance(stats, dict) or not files:
        raise UserError(f'{labels_dir} is not a pseudo-label directory (needs stats.json and data/*.parquet); '
                        'make one with `noisystudent label`.')
    return stats, files


def check_stages(out: Path, names: List[str], hashes: Dict[str, str], restart_from: Optional[str]) -> None:
    """Refuse a run whose finished stages were made with another config; clear what is redone."""
    state = process_state()
    if restart_from is not None and restart_from not in names:
        raise UserError(f"--restart-from {restart_from!r} is not a stage of this run; stages: {', '.join(names)}.")
    first_redo = names.index(restart_from) if restart_from else len(names)
    for i, name in enumerate(names):
        stage_dir = out / name
        if not stage_dir.exists() or i >= first_redo:
            continue
        recorded = recorded_hash(stage_dir)
        if recorded is UNREADABLE:
            warnings.warn(f'{stage_dir / "stage.json"} is not valid JSON, so it is unknown what made {name}; '
                          f'redoing {name} and the stages after it.', stacklevel=2)
            first_redo = i
            break
        if recorded is not None and recorded != hashes[name]:
            if is_done(stage_dir):
                raise UserError(
                    f'the config changed since stage {name} finished in {out}; rerun with '
                    f'--restart-from {name} to redo it and what follows, or use another --output.')
            first_redo = i  # an unfinished stage with stale checkpoints starts over
            break
    for name in names[:first_redo]:
        missing = missing_output(out / name) if is_done(out / name) else None
        if missing:
            raise UserError(f'stage {name} is marked done but {missing}; rerun with --restart-from {name} to redo '
                            'it and what follows.')
    if state.is_main_process:
        for name in names[first_redo:]:
            shutil.rmtree(out / name, ignore_errors=True)
        if first_redo < len(names):
            shutil.rmtree(out / 'final', ignore_errors=True)
    state.wait_for_everyone()

