"""Teacher -> pseudo labels -> confidence threshold -> class balance.

``label`` runs the teacher un-noised (eval mode, ``inference_mode``, channels_last, its own eval
transform) over the unlabeled set and writes a label directory:

```
OUT/raw/manifest.json              what the raw shards were made with; a mismatch discards them
OUT/raw/*.parquet                  every labeled row, one file per shard, written as they finish
OUT/data/*.parquet                 the selected rows (threshold + balance), what a student reads
OUT/confidence.png                 confidence histogram, per-class counts before/after selection
OUT/stats.json                     written last
```

Each row holds ``index`` (the row in the unlabeled source), the soft label (``probs``, or
``topk_idx``/``topk_prob`` for many classes), ``label`` (the argmax) and ``confidence`` (the top-1
probability of softmax(logits / T)). With hard labels, the soft label columns hold the one-hot
target and ``confidence`` stays the teacher's.

Work is cut into shards that each process labels and writes on its own, so memory stays
bounded and a killed run resumes: finished shards are kept and only missing rows are labeled.
A map-style dataset is cut into fixed index ranges (the same whatever the process count); a
streaming dataset is split with ``split_dataset_by_node`` and each process cuts its own stream.
"""
import copy
import hashlib
import json
import math
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets.distributed import split_dataset_by_node

from .config import DEFAULT_TOPK, FULL_PROBS_MAX_CLASSES, DataSource, LabelsConfig, UserError
from .files import (atomic_path, output_lock, remove_tree, replace_dir, save_figure, warn_if_short_of_space,
                    write_json_atomic)
from .data import (
    EvalTransform, ImageRows, SourceLike, as_source, collate, decode_image, image_column_of,
    check_output_outside, load_source, source_identity, source_record, undecoded,
)
from .runtime import (
    Preempted, StopFlag, choose_workers, cpu_threads, make_accelerator, num_workers_for, process_state, progress_bar,
    resolve_precision, torch_threads,
)
from .models import data_config_of, fold_batchnorm, label_names_of, load_model

__all__ = ['label', 'select', 'selection_notes', 'per_class_target', 'read_raw', 'AGREEMENT_SAMPLE']

AGREEMENT_SAMPLE = 256  # images labeled twice (mixed precision and fp32) to report their agreement
FAILED_LISTED_MAX = 10_000  # stats.json names at most this many undecodable rows
_INDEX = '__ns_index__'  # the global row index added to a streamed source before it is split
_META_KEY = b'noisystudent'


# --- selection -----------------------------------------------------------------------------------

def per_class_target(counts: Sequence[int], per_class: Union[str, int, None], rows_labeled: int = 0,
                     num_classes: Optional[int] = None) -> Optional[int]:
    """N, the rows per class after balancing; None when balancing is off.

    'auto' is the median count over the classes that kept any row (empty classes stay empty
    and would drag the median to zero), rounded half up, and at least half an even share of the
    ``rows_labeled`` rows: a teacher that is confident about little still hands its student a set
    of about half the unlabeled data, not a near-empty one.
    """
    if per_class is None or per_class == 'none':
        return None
    if per_class == 'auto':
        nonzero = np.asarray(counts)[np.asarray(counts) > 0]
        median = int(math.floor(float(np.median(nonzero)) + 0.5)) if nonzero.size else 0
        classes = num_classes or len(counts) or 1
        return max(median, math.ceil(rows_labeled / (2 * classes)))
    if isinstance(per_class, str) and per_class.isdigit():
        per_class = int(per_class)
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise UserError(f"per_class must be 'auto', 'none' or a positive integer, got {per_class!r}")
    return int(per_class)


def _label_confidence(rows) -> Tuple[np.ndarray, np.ndarray]:
    if isinstance(rows, pa.Table):
        return (rows.column('label').to_numpy().astype(np.int64),
                rows.column('confidence').to_numpy().astype(np.float32))
    if isinstance(rows, tuple) and len(rows) == 2:
        labels, conf = rows
    else:
        labels, conf = rows['label'], rows['confidence']
    return np.asarray(labels, dtype=np.int64).reshape(-1), np.asarray(conf, dtype=np.float32).reshape(-1)


def select(
        rows: Union[pa.Table, Mapping[str, Any], Tuple[Any, Any]],
        num_classes: int,
        threshold: float = 0.3,
        per_class: Union[str, int, None] = 'auto',
        seed: int = 0,
        fill: bool = True,
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Positions of the selected rows (ascending, a duplicated row repeated), and the counts.

    ``rows`` has ``label`` and ``confidence`` (a pyarrow Table, a mapping of arrays, or a
    ``(label, confidence)`` pair). A row survives when its confidence is >= ``threshold``. Then each
    class is balanced to N rows (see ``per_class_target``): a class with n > N keeps its N most
    confident rows (ties by position). A class with fewer than N rows above the threshold first
    takes, when ``fill`` is set, its most confident rows below it, up to N (the official code lowers
    a short class's threshold the same way). A class still at n < N gives every row floor(N/n)
    copies and N mod n rows, drawn without replacement, one more, so each row gets the extra copy
    with probability (N mod n)/n and the class has exactly N rows. The draw depends only on the
    seed, the class and the rows. A class that is the argmax of no row stays empty.
    """
    labels, conf = _label_confidence(rows)
    if labels.shape != conf.shape:
        raise ValueError(f'label and confidence differ in length: {labels.shape[0]} vs {conf.shape[0]}')
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f'labels must be in [0, {num_classes}), found {labels.min()}..{labels.max()}')
    above = conf >= threshold  # NaN never passes
    kept = np.flatnonzero(above)
    counts_labeled = np.bincount(labels, minlength=num_classes)
    counts_before = np.bincount(labels[kept], minlength=num_classes)
    target = per_class_target(counts_before, per_class, labels.size, num_classes)
    filled: List[int] = []
    if target is None:
        selected = kept
    else:
        # every row, by class, then most confident first (NaN last), then position
        pool = np.arange(labels.size)
        order = pool[np.lexsort((pool, -np.nan_to_num(conf, nan=-np.inf), labels))]
        bounds = np.concatenate([[0], np.cumsum(counts_labeled)])
        parts = []
        for c in np.flatnonzero(counts_labeled):
            block = order[bounds[c]:bounds[c + 1]]
            n_above = int(counts_before[c])
            if fill and n_above < target:
                block = block[:target]  # the above-threshold rows come first
                if block.size > n_above:
                    filled.append(int(c))
            else:
                block = block[:n_above]
            if block.size:
                parts.append(_balanced(block, target, seed, int(c)))
        selected = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    selected = selected.astype(np.int64)
    counts_after = np.bincount(labels[selected], minlength=num_classes)
    unique = np.unique(selected)
    stats = {
        'threshold': float(threshold),
        'per_class': per_class if per_class is not None else 'none',
        'per_class_target': target,
        'fill': bool(fill),
        'rows_labeled': int(labels.size),
        'rows_before': int(kept.size),
        'rows_after': int(selected.size),
        'duplicated': int(selected.size - unique.size),
        'rows_below_threshold': int((~above[unique]).sum()),
        'filled_classes': filled,
        'empty_classes': np.flatnonzero(counts_after == 0).tolist(),
        'counts_labeled': counts_labeled.tolist(),
        'counts_before': counts_before.tolist(),
        'counts_after': counts_after.tolist(),
        'seed': int(seed),
    }
    return selected, stats


def _balanced(block: np.ndarray, target: int, seed: int, cls: int) -> np.ndarray:
    """``block`` (one class, most confident first) brought to exactly ``target`` rows."""
    n = block.size
    if n >= target:
        return block[:target]
    copies = np.full(n, target // n, dtype=np.int64)
    extra = target % n
    if extra:
        by_position = np.sort(block)
        rng = np.random.default_rng([int(seed), cls])
        lucky = by_position[rng.choice(n, size=extra, replace=False)]
        copies[np.isin(block, lucky)] += 1
    return np.repeat(block, copies)


def selection_notes(sel: Dict[str, Any], label_names: Sequence[str] = ()) -> List[str]:
    """One line per thing selection did that the user should know: fill, duplicates, empty classes."""
    def names(classes):
        shown = [str(label_names[c]) if c < len(label_names) else str(c) for c in classes[:10]]
        return ', '.join(shown) + (f' and {len(classes) - 10} more' if len(classes) > 10 else '')

    notes = []
    labeled, kept, after = sel['rows_labeled'], sel['rows_before'], sel['rows_after']
    if not labeled:
        return notes
    share = f'{100.0 * kept / labeled:.1f}%'
    target = sel['per_class_target']
    if target is None:
        if kept * 2 < labeled:
            notes.append(f'the confidence threshold {sel["threshold"]:g} kept {kept} of {labeled} images ({share}) '
                         'and balancing is off (per_class: none); lower the threshold or use a stronger teacher.')
        return notes
    if sel['filled_classes']:
        filled = len(sel['filled_classes'])
        noun, verb, own = ('class', 'was', 'its') if filled == 1 else ('classes', 'were', 'their')
        below = sel['rows_below_threshold']
        notes.append(f'the threshold {sel["threshold"]:g} kept {kept} of {labeled} images ({share}); '
                     f'{filled} {noun} short of N={target} {verb} filled with {own} most confident rows below '
                     f'it ({below} {"row" if below == 1 else "rows"}): {names(sel["filled_classes"])}.')
    elif kept * 2 < labeled:
        notes.append(f'the threshold {sel["threshold"]:g} kept {kept} of {labeled} images ({share}); '
                     f'{after} after balancing to N={target}.')
    if sel['duplicated']:
        dup = sel['duplicated']
        notes.append(f'{dup} selected {"row is a duplicate" if dup == 1 else "rows are duplicates"} of classes '
                     f'with fewer than N={target} images in all.')
    if sel['empty_classes']:
        notes.append(f'no pseudo-labeled image was kept for {names(sel["empty_classes"])}; '
                     'the student sees those classes only in the labeled data.')
    return notes


# --- the teacher ---------------------------------------------------------------------------------

def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of the state dict (names, dtypes, shapes, bytes in standard layout)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f'{name}:{t.dtype}:{tuple(t.shape)};'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return h.hexdigest()


def _teacher(teacher: Union[str, os.PathLike, torch.nn.Module],
             allow_pickle: bool = False) -> Tuple[torch.nn.Module, str]:
    if isinstance(teacher, torch.nn.Module):
        # a model object says only what it is; its weights are named by weights_sha256
        cfg = getattr(teacher, 'pretrained_cfg', None) or {}
        return teacher, cfg.get('architecture') or type(teacher).__name__
    return load_model(teacher, allow_pickle=allow_pickle), os.fspath(teacher)


# --- shards --------------------------------------------------------------------------------------

def _soft_columns(probs: torch.Tensor, topk: Optional[int]) -> Tuple[Dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The soft-label columns of a batch, its argmax labels and confidences."""
    if topk:
        values, idx = probs.topk(topk, dim=-1)
        # ties in index order, so the label is argmax's (topk orders equal values arbitrarily)
        idx, by_index = idx.sort(dim=-1)
        values, by_value = values.gather(-1, by_index).sort(dim=-1, descending=True, stable=True)
        idx = idx.gather(-1, by_value)
        cols = {'topk_idx': idx.cpu().numpy().astype(np.int64), 'topk_prob': values.cpu().numpy().astype(np.float32)}
        return cols, cols['topk_idx'][:, 0].copy(), cols['topk_prob'][:, 0].copy()
    labels = probs.argmax(dim=-1)  # the first of tied maxima, as torch.argmax and numpy document (max does not)
    conf = probs.gather(-1, labels[:, None])[:, 0]
    return ({'probs': probs.cpu().numpy().astype(np.float32)}, labels.cpu().numpy().astype(np.int64),
            conf.cpu().numpy().astype(np.float32))


def _list_array(values: np.ndarray) -> pa.ListArray:
    n, width = values.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width)  # also for a shard of only undecodable rows
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))


def _schema(topk: Optional[int]) -> pa.Schema:
    soft = ([('topk_idx', pa.list_(pa.int64())), ('topk_prob', pa.list_(pa.float32()))] if topk
            else [('probs', pa.list_(pa.float32()))])
    return pa.schema([('index', pa.int64())] + soft + [('label', pa.int64()), ('confidence', pa.float32())])


class _Shard:
    """The rows of one shard as they are labeled; written once, atomically, when complete."""

    def __init__(self, path: Path, topk: Optional[int]):
        self.path = path
        self.topk = topk
        self.parts: List[Dict[str, np.ndarray]] = []
        self.failed: List[int] = []
        self.consumed = 0
        self.agree = [0, 0]

    def add(self, index: np.ndarray, soft: Dict[str, np.ndarray], labels, conf, skipped: Sequence[int]) -> None:
        if index.size:
            self.parts.append({'index': index, **soft, 'label': labels, 'confidence': conf})
        self.failed.extend(int(i) for i in skipped)
        self.consumed += int(index.size) + len(skipped)

    def write(self) -> int:
        schema = _schema(self.topk)
        cols = {}
        for name in schema.names:
            if self.parts:
                values = np.concatenate([p[name] for p in self.parts])
            else:
                width = self.topk if name.startswith('topk') else 0
                dtype = np.int64 if name in ('index', 'label', 'topk_idx') else np.float32
                values = np.zeros((0, width) if name in ('probs', 'topk_idx', 'topk_prob') else 0, dtype)
            cols[name] = _list_array(values) if values.ndim == 2 else pa.array(values)
        meta = {'failed': self.failed, 'consumed': self.consumed, 'agree': self.agree}
        table = pa.table(cols, schema=schema.with_metadata({_META_KEY: json.dumps(meta).encode()}))
        _write_parquet(table, self.path)
        return table.num_rows


def _write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path, need=table.nbytes) as tmp:  # a full disk leaves no partial file behind, and says so
        if table.num_rows:
            pq.write_table(table, tmp)
        else:  # no row group at all: datasets cannot read one of zero rows
            pq.ParquetWriter(tmp, table.schema).close()


def _shard_meta(path: Path) -> Dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(_META_KEY, b'{}'))


def raw_files(output: Union[str, os.PathLike]) -> List[Path]:
    return sorted((Path(output) / 'raw').glob('*.parquet'))


def read_raw(output: Union[str, os.PathLike]) -> datasets.Dataset:
    """Every labeled row of a label directory (before selection), as a Dataset."""
    files = raw_files(output)
    if not files:
        raise UserError(f'{output} has no raw pseudo labels; run `noisystudent label` first.')
    return datasets.load_dataset('parquet', data_files=[str(f) for f in files], split='train')


# --- labeling ------------------------------------------------------------------------------------

class _Labeler:
    """The un-noised teacher forward: soft labels at temperature T, and an fp32 cross-check."""

    def __init__(self, model, accelerator, temperature: float, topk: Optional[int], check_agreement: bool,
                 normalize=None):
        self.model = model
        self.accelerator = accelerator
        self.normalize = normalize  # uint8 batches (EvalTransform) become model input on the device
        self.temperature = temperature
        self.topk = topk
        self.agreement_left = AGREEMENT_SAMPLE if check_agreement else 0

    @torch.inference_mode()
    def __call__(self, batch, shard: _Shard) -> None:
        index = batch.index.numpy().astype(np.int64)
        if not index.size:
            shard.add(index, {}, None, None, batch.skipped)
            return
        x = batch.pixel_values.to(self.accelerator.device, non_blocking=True)
        if x.dtype == torch.uint8 and self.normalize is not None:
            x = self.normalize(x)
        x = x.contiguous(memory_format=torch.channels_last)
        with self.accelerator.autocast():
            logits = self.model(x)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        soft, labels, conf = _soft_columns(probs, self.topk)
        if self.agreement_left > 0:
            n = min(self.agreement_left, len(index))
            with torch.autocast(device_type=x.device.type, enabled=False):
                full = self.model(x[:n].float()).float().argmax(-1).cpu().numpy()
            shard.agree[0] += int((full == logits[:n].float().argmax(-1).cpu().numpy()).sum())
            shard.agree[1] += n
            self.agreement_left -= n
        shard.add(index, soft, labels, conf, batch.skipped)


def _map_shards(num_rows: int, rows_per_shard: int, rank: int, world: int) -> List[Tuple[int, int]]:
    """The index ranges a process labels: every world-th one, the same whatever ran before."""
    bounds = [(s, min(s + rows_per_shard, num_rows)) for s in range(0, num_rows, rows_per_shard)]
    return bounds[rank::world]


def _map_shard_path(raw: Path, start: int, stop: int) -> Path:
    return raw / f'rows-{start:012d}-{stop:012d}.parquet'


class _RangeBatches:
    """Batches of consecutive indices within each range, made as they are asked for."""

    def __init__(self, ranges: List[Tuple[int, int]], batch_size: int):
        self.ranges, self.batch_size = ranges, batch_size

    def __iter__(self):
        for start, stop in self.ranges:
            for b in range(start, stop, self.batch_size):
                yield list(range(b, min(b + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(math.ceil((stop - start) / self.batch_size) for start, stop in self.ranges)


def _stopped(halt: Optional[StopFlag], raw: Path) -> None:
    # SIGTERM/SIGINT: stop at a batch boundary; finished shards are on disk, the current one is dropped
    if halt is not None and halt.signal is not None:
        raise Preempted(f'stopped by signal {halt.signal} while labeling; the finished shards in {raw} are kept.',
                        halt.signal)


def _label_map_style(ds, image_col, transform, labeler, raw: Path, batch_size, rows_per_shard,
                     num_workers, rank, world, bar, halt: Optional[StopFlag] = None) -> int:
    """Label this process's share of the index ranges that have no shard yet; returns rows done."""
    pending = [(s, e) for s, e in _map_shards(len(ds), rows_per_shard, rank, world)
               if not _map_shard_path(raw, s, e).exists()]
    if not pending:
        return 0
    loader = torch.utils.data.DataLoader(ImageRows(ds, image_col, transform),
                                         batch_sampler=_RangeBatches(pending, batch_size),
                                         collate_fn=collate, num_workers=num_workers)
    ranges = iter(pending)
    start, stop = next(ranges)
    shard = _Shard(_map_shard_path(raw, start, stop), labeler.topk)
    done = 0
    for batch in loader:  # in order: each batch lies in one range, and the ranges come one by one
        labeler(batch, shard)
        n = len(batch.index) + len(batch.skipped)
        done += n
        bar.update(n)
        if shard.consumed == stop - start:
            shard.write()
            start, stop = next(ranges, (None, None))
            shard = _Shard(_map_shard_path(raw, start, stop), labeler.topk) if start is not None else None
        _stopped(halt, raw)
    return done


def _add_index(example, idx):
    return {_INDEX: idx}


class _StreamBatches(torch.utils.data.IterableDataset):
    """Collated batches from this process's split of a streamed source, after ``skip`` rows."""

    def __init__(self, ds, image_col: str, transform, batch_size: int, skip: int):
        self.ds, self.image_col, self.transform = ds, image_col, transform
        self.batch_size, self.skip = batch_size, skip

    def __iter__(self):
        rows = {'pixel_values': [], 'index': []}
        for n, example in enumerate(self.ds):
            if n < self.skip:
                continue  # labeled by an earlier run; not decoded
            img = decode_image(example[self.image_col])
            rows['pixel_values'].append(self.transform(img) if img is not None else None)
            rows['index'].append(int(example[_INDEX]))
            if len(rows['index']) == self.batch_size:
                yield collate(rows)
                rows = {'pixel_values': [], 'index': []}
        if rows['index']:
            yield collate(rows)


def _stream_shard_path(raw: Path, rank: int, world: int, seq: int) -> Path:
    return raw / f'stream-w{world:03d}-r{rank:03d}-{seq:06d}.parquet'


def _label_streaming(ds, image_col, transform, labeler, raw: Path, batch_size, rows_per_shard,
                     num_workers, rank, world, bar, halt: Optional[StopFlag] = None) -> int:
    """Label this process's split of a streamed source past the rows its earlier shards hold."""
    mine = sorted(raw.glob(f'stream-w{world:03d}-r{rank:03d}-*.parquet'))
    skip = sum(_shard_meta(p)['consumed'] for p in mine)
    if bar.total is not None:
        bar.update(min(skip, bar.total))
    ds = undecoded(ds.select_columns([image_col]), image_col).map(_add_index, with_indices=True)
    if world > 1:
        # 'examples' keeps the index global; 'shards' would restart it in every shard
        ds = split_dataset_by_node(ds, rank=rank, world_size=world, strategy='examples')
    batches = _StreamBatches(ds, image_col, transform, batch_size, skip)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=min(num_workers, 1))
    seq, done = len(mine), 0
    shard = _Shard(_stream_shard_path(raw, rank, world, seq), labeler.topk)
    for batch in loader:
        labeler(batch, shard)
        n = len(batch.index) + len(batch.skipped)
        done += n
        bar.update(n)
        if shard.consumed >= rows_per_shard:
            shard.write()
            seq += 1
            shard = _Shard(_stream_shard_path(raw, rank, world, seq), labeler.topk)
        if halt is not None and halt.signal is not None and shard.consumed:
            shard.write()  # a stream shard resumes by its row count, so a short one is still whole
        _stopped(halt, raw)
    if shard.consumed:
        shard.write()
    return done


def _prepare_raw(raw: Path, manifest: Dict[str, Any]) -> bool:
    """Keep the raw shards only if they were made the same way; True when some are reused."""
    raw.mkdir(parents=True, exist_ok=True)
    for tmp in raw.glob('.*.tmp-*'):
        tmp.unlink(missing_ok=True)  # a killed writer's leftovers
    path = raw / 'manifest.json'
    old = json.loads(path.read_text()) if path.is_file() else None
    if old != manifest:
        if old is not None and any(raw.glob('*.parquet')):
            changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            warnings.warn(f'discarding the raw pseudo labels in {raw}: made with other settings '
                          f'({", ".join(changed)}); labeling from scratch.', stacklevel=3)
        for f in raw.glob('*.parquet'):
            f.unlink()
        write_json_atomic(path, manifest)
        return False
    for shard in sorted(raw.glob('*.parquet')):
        problem = _shard_problem(shard, manifest)
        if problem:
            warnings.warn(f'redoing the raw shard {shard.name}: {problem}.', stacklevel=3)
            shard.unlink()
    return any(raw.glob('*.parquet'))


def _shard_problem(path: Path, manifest: Dict[str, Any]) -> Optional[str]:
    """Why a raw shard cannot be reused as complete, or None: it must read and hold its whole range."""
    try:
        meta = _shard_meta(path)
        rows = pq.ParquetFile(path).metadata.num_rows
        index = pq.read_table(path, columns=['index']).column('index').to_numpy()
    except Exception as e:  # noqa: BLE001 - any unreadable file is redone
        return f'it is not a readable parquet file ({type(e).__name__})'
    failed = meta.get('failed', [])
    if meta.get('consumed') != rows + len(failed):
        return f'it holds {rows + len(failed)} rows but records {meta.get("consumed")}'
    m = re.fullmatch(r'rows-(\d+)-(\d+)\.parquet', path.name)
    if m:
        start, stop = int(m.group(1)), int(m.group(2))
        expected = (start % manifest['rows_per_shard'] == 0 and
                    stop == min(start + manifest['rows_per_shard'], manifest['num_rows'] or stop))
        if not expected:
            return 'its row range is not one this labeling makes'
        if rows + len(failed) != stop - start:
            return f'it holds {rows + len(failed)} of its {stop - start} rows'
        seen = np.concatenate([index, np.asarray(failed, np.int64)])
        if seen.size and (seen.min() < start or seen.max() >= stop or np.unique(seen).size != seen.size):
            return f'its rows are not rows {start} to {stop - 1}'
    return None


def label(
        teacher: Union[str, os.PathLike, torch.nn.Module],
        source: Union[SourceLike, os.PathLike],
        output: Union[str, os.PathLike],
        cfg: Optional[LabelsConfig] = None,
        *,
        seed: int = 0,
        num_workers: Optional[int] = None,
        progress: bool = True,
        image_size: Optional[int] = None,
        rows_per_shard: Optional[int] = None,
        allow_pickle: bool = False,
) -> Dict[str, Any]:
    """Pseudo-label ``source`` with ``teacher`` into ``output``, select, and return the stats.

    Runs under ``accelerate launch``: every process labels its own shards; the main process
    selects and writes ``data/``, ``confidence.png`` and ``stats.json`` (last). Running again
    reuses the finished raw shards; changing only the threshold, balancing, hard/soft or seed
    re-selects without labeling. SIGTERM/SIGINT stop it at the next batch with ``engine.Preempted``;
    the finished shards are kept for the rerun. ``allow_pickle``: see ``models.load_model``.
    """
    check_output_outside(output, os.fspath(source) if isinstance(source, os.PathLike) else source, 'unlabeled')
    with output_lock(output, process_state()):  # one process writes a label directory
        return _label(teacher, source, output, cfg, seed=seed, num_workers=num_workers, progress=progress,
                      image_size=image_size, rows_per_shard=rows_per_shard, allow_pickle=allow_pickle)


def _label(teacher, source, output, cfg, *, seed, num_workers, progress, image_size, rows_per_shard,
           allow_pickle) -> Dict[str, Any]:
    """``label`` itself, while it holds the output directory's lock."""
    cfg = cfg or LabelsConfig()
    t_start = time.perf_counter()
    output = Path(output)
    precision = resolve_precision(cfg.mixed_precision, 'inference')
    accelerator = make_accelerator(precision, seed=seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process

    owned = not isinstance(teacher, torch.nn.Module)
    model, spec = _teacher(teacher, allow_pickle)
    num_classes = int(getattr(model, 'num_classes', 0) or 0)
    if num_classes < 1:
        raise UserError(f'the teacher {spec} has no classifier head; pass a classification model.')
    data_config = data_config_of(model, image_size)
    transform = EvalTransform.of(data_config)  # timm's eval transform, cheaper; uint8 out
    topk = min(cfg.topk, num_classes) if cfg.topk else (DEFAULT_TOPK if num_classes > FULL_PROBS_MAX_CLASSES else None)
    model = model.eval().to(accelerator.device, memory_format=torch.channels_last)

    src = as_source(os.fspath(source) if isinstance(source, os.PathLike) else source)
    ds = load_source(src)
    image_col = image_column_of(ds, src.image_column if isinstance(src, DataSource) else None)
    streaming = isinstance(ds, datasets.IterableDataset)
    num_rows = None if streaming else len(ds)
    if num_rows == 0:
        raise UserError('the unlabeled set is empty; check the path and split.')
    if num_rows is None:
        split_info = (ds.info.splits or {}).get(str(ds.split)) if ds.split else None
        num_rows = getattr(split_info, 'num_examples', None) or None
    if rows_per_shard is not None and rows_per_shard < 1:
        raise UserError(f'rows_per_shard must be at least 1, got {rows_per_shard}')
    rows_per_shard = rows_per_shard or 32 * cfg.batch_size
    fingerprint = None if streaming else getattr(ds, '_fingerprint', None)
    identity = source_identity(ds, image_col, src)
    record = source_record(src, full=True)
    if record is not None:
        record['image_column'] = image_col
        if identity['where'] != record['path']:
            record['resolved'] = identity['where']  # another working directory must not find another folder

    raw = output / 'raw'
    if main:
        output.mkdir(parents=True, exist_ok=True)
        (output / 'stats.json').unlink(missing_ok=True)  # the directory is unfinished until it is back
        manifest = {
            'teacher_sha256': weights_sha256(model), 'num_classes': num_classes,
            'temperature': float(cfg.temperature), 'topk': topk, 'mixed_precision': precision,
            'data_config': {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
            'source': record, 'identity': identity, 'num_rows': None if streaming else num_rows,
            'streaming': streaming, 'rows_per_shard': rows_per_shard,
            'num_processes': world if streaming else None,  # a stream is cut per process
        }
        _prepare_raw(raw, manifest)
        if num_rows:
            _warn_if_short_of_space(output, raw, num_rows, num_classes, topk)
    accelerator.wait_for_everyone()

    # BatchNorm folded into the convs: a model we loaded is folded in place, a caller's is copied first
    example = torch.randn(2, *data_config['input_size'], device=accelerator.device)
    model = fold_batchnorm(model if owned else copy.deepcopy(model), example).to(memory_format=torch.channels_last)
    labeler = _Labeler(model, accelerator, cfg.temperature, topk, check_agreement=main and precision != 'no',
                       normalize=getattr(transform, 'normalize', None))
    workers = (num_workers_for(num_workers, data_config['input_size'][-1], accelerator.device) if streaming else
               choose_workers(num_workers, ImageRows(ds, image_col, transform), model, data_config['input_size'],
                              accelerator.device, train=False,
                              autocast=torch.bfloat16 if precision == 'bf16' else None, batch_size=cfg.batch_size))
    desc = f'labeling ({world} processes)' if world > 1 else 'labeling'
    bar = progress_bar(total=_rows_of_process(num_rows, streaming, rows_per_shard, rank, world),
                       disable=not (progress and main), desc=desc, unit='img')
    if not streaming:
        bar.update(sum(e - s for s, e in _map_shards(num_rows, rows_per_shard, rank, world)
                       if _map_shard_path(raw, s, e).exists()))
    t_label = time.perf_counter()
    run = _label_streaming if streaming else _label_map_style
    with StopFlag() as halt, bar, torch_threads(cpu_threads(workers, accelerator.device)):
        done = run(ds, image_col, transform, labeler, raw, cfg.batch_size, rows_per_shard, workers, rank, world, bar,
                   halt=halt)
    done_all = int(accelerator.reduce(torch.tensor([done], device=accelerator.device), 'sum').item()) \
        if world > 1 else done
    label_seconds = time.perf_counter() - t_label

    if main:
        stats = _finish(output, cfg, seed, num_classes, topk, label_names_of(model), precision, record, fingerprint,
                        spec, manifest['teacher_sha256'], data_config, world, rows_per_shard)
        if identity.get('rows') is None:  # a stream: its length is known now that it was read whole
            identity = dict(identity, rows=stats['rows_labeled'] + stats['failed_count'])
        stats['source_identity'] = identity
        stats['rows_labeled_now'] = done_all
        stats['rows_resumed'] = stats['rows_labeled'] + stats['failed_count'] - done_all
        stats['seconds'] = round(time.perf_counter() - t_start, 3)
        stats['labeling_seconds'] = round(label_seconds, 3)
        stats['img_per_s'] = round(done_all / max(label_seconds, 1e-9), 2)
        write_json_atomic(output / 'stats.json', stats)  # last: the directory is complete
    accelerator.wait_for_everyone()
    stats = json.loads((output / 'stats.json').read_text())
    if stats['rows_labeled'] == 0:
        raise UserError(f'none of the {stats["failed_count"]} unlabeled images could be decoded (they are listed '
                        f'in {output / "stats.json"}); check the files, the path and the image column.')
    return stats


def _warn_if_short_of_space(output: Path, raw: Path, num_rows: int, num_classes: int, topk: Optional[int]) -> None:
    """Before labeling: do the raw shards still to write, and the selected copy of them, fit?"""
    row = 8 + 8 + 4 + 4 + (12 * topk if topk else 4 * num_classes)  # index, label, confidence, offsets, soft label
    have = sum(f.stat().st_size for f in raw.glob('*.parquet'))
    need = max(num_rows * row - have, 0) + num_rows * row
    if need:
        warn_if_short_of_space(output, need, f'raw shards and the selected data of {num_rows:,} rows')


def _rows_of_process(num_rows: Optional[int], streaming: bool, rows_per_shard: int, rank: int, world: int):
    if num_rows is None:
        return None
    if streaming:
        return len(range(rank, num_rows, world))
    return sum(e - s for s, e in _map_shards(num_rows, rows_per_shard, rank, world))


def _finish(output: Path, cfg: LabelsConfig, seed, num_classes, topk, label_names, precision, record,
            fingerprint, spec, sha, data_config, world, rows_per_shard) -> Dict[str, Any]:
    """Select from the raw shards, write data/ and confidence.png; the stats (not yet written)."""
    files = raw_files(output)
    index, labels, conf, sizes, failed, agree = [], [], [], [], [], [0, 0]
    for f in files:
        t = pq.read_table(f, columns=['index', 'label', 'confidence'])
        index.append(t.column('index').to_numpy())
        labels.append(t.column('label').to_numpy())
        conf.append(t.column('confidence').to_numpy())
        sizes.append(t.num_rows)
        meta = _shard_meta(f)
        failed.extend(meta.get('failed', []))
        agree = [a + b for a, b in zip(agree, meta.get('agree', [0, 0]))]
    index = np.concatenate(index) if index else np.zeros(0, np.int64)
    labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    conf = np.concatenate(conf) if conf else np.zeros(0, np.float32)
    # select in index order, so the result does not depend on how the work was split
    order = np.argsort(index, kind='stable')
    picked, sel = select({'label': labels[order], 'confidence': conf[order]}, num_classes,
                         cfg.threshold, cfg.per_class, seed, fill=cfg.fill)
    picked = np.sort(order[picked], kind='stable')
    _write_selected(output, files, sizes, picked, cfg.soft, topk, num_classes)
    warnings_list = selection_notes(sel, label_names)
    for line in warnings_list:
        warnings.warn(line, stacklevel=3)
    failed = sorted(failed)
    stats = {
        'source': record,
        'source_fingerprint': fingerprint,
        'teacher': {'spec': spec, 'weights_sha256': sha},
        'num_classes': num_classes,
        'label_names': list(label_names),
        'soft': bool(cfg.soft),
        'temperature': float(cfg.temperature),
        'format': 'topk' if topk else 'probs',
        'topk': topk,
        **sel,
        'failed_images': failed[:FAILED_LISTED_MAX],
        'failed_count': len(failed),
        'mixed_precision': precision,
        'agreement_bf16_fp32': round(agree[0] / agree[1], 6) if agree[1] and precision == 'bf16' else None,
        'agreement_sample': agree[1],
        'image_size': int(data_config['input_size'][-1]),
        'data_config': {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        'batch_size': cfg.batch_size,
        'num_processes': world,
        'rows_per_shard': rows_per_shard,
        'warnings': warnings_list,
    }
    if precision == 'fp16':
        stats['agreement_fp16_fp32'] = round(agree[0] / agree[1], 6) if agree[1] else None
    if len(failed) > FAILED_LISTED_MAX:
        stats['failed_images_truncated'] = True
    _plot(output / 'confidence.png', conf, sel, cfg.threshold, label_names)
    return stats


def _hardened(table: pa.Table, topk: Optional[int], num_classes: int) -> pa.Table:
    """The soft-label columns replaced by the one-hot target of ``label``."""
    labels = table.column('label').to_numpy()
    n = labels.size
    if topk:
        prob = np.zeros((n, topk), np.float32)
        prob[:, 0] = 1.0
        return table.set_column(table.schema.get_field_index('topk_prob'), 'topk_prob', _list_array(prob))
    onehot = np.zeros((n, num_classes), np.float32)
    onehot[np.arange(n), labels] = 1.0
    return table.set_column(table.schema.get_field_index('probs'), 'probs', _list_array(onehot))


def _write_selected(output: Path, files: List[Path], sizes: List[int], picked: np.ndarray, soft: bool,
                    topk: Optional[int], num_classes: int) -> None:
    """data/: one file per raw shard with its selected rows; swapped in whole."""
    for stale in output.glob('.data.tmp-*'):  # what a killed or failed earlier selection left
        remove_tree(stale)
    tmp = output / f'.data.tmp-{os.getpid()}'
    tmp.mkdir(parents=True)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    written = 0
    try:
        for k, f in enumerate(files):
            lo, hi = np.searchsorted(picked, [offsets[k], offsets[k + 1]])
            if hi == lo:
                continue
            table = pq.read_table(f).take(pa.array(picked[lo:hi] - offsets[k]))
            table = table.replace_schema_metadata(None)
            if not soft:
                table = _hardened(table, topk, num_classes)
            _write_parquet(table, tmp / f.name)
            written += 1
        if not written:  # nothing selected: still a loadable, empty table with the columns
            _write_parquet(_schema(topk).empty_table(), tmp / 'empty.parquet')
        replace_dir(tmp, output / 'data')
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _plot(path: Path, conf: np.ndarray, sel: Dict[str, Any], threshold: float, label_names: Sequence[str]) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    ax1.hist(conf, bins=50, range=(0, 1), color='tab:blue')
    ax1.axvline(threshold, color='tab:red', linestyle='--', label=f'threshold {threshold:g}')
    ax1.set_xlabel('confidence (top-1 probability)')
    ax1.set_ylabel('images')
    ax1.set_title(f'{sel["rows_labeled"]} labeled, {sel["rows_before"]} above the threshold')
    ax1.legend()
    classes = np.arange(len(sel['counts_before']))
    width = 0.4
    ax2.bar(classes - width / 2, sel['counts_before'], width, label='after threshold')
    ax2.bar(classes + width / 2, sel['counts_after'], width, label='after balancing')
    if sel['per_class_target'] is not None:
        ax2.axhline(sel['per_class_target'], color='tab:red', linestyle='--', label=f'N = {sel["per_class_target"]}')
    if len(classes) <= 20:
        ax2.set_xticks(classes)
        ax2.set_xticklabels([str(n)[:12] for n in label_names], rotation=45, ha='right')
    ax2.set_xlabel('class')
    ax2.set_ylabel('images')
    ax2.set_title('per-class counts')
    ax2.legend()
    save_figure(fig, path, dpi=80)
