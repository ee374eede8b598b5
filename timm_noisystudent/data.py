"""Datasets in, batches out.

A source is anything ``datasets.load_dataset`` takes (Hub id, image folder, parquet directory),
a ``save_to_disk`` directory, or a ``datasets.Dataset``. Images stay encoded until a batch is
made: the image column is cast to ``Image(decode=False)`` and decoded in the lazy transform, so
one broken file is skipped and counted instead of stopping a run.
"""
import collections
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import stat
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from .config import DataSource, UserError
from .rundir import labels_files
from .runtime import progress_bar

IMAGE_COLUMNS = ('image', 'img', 'pixel_values')
LABEL_COLUMNS = ('label', 'labels', 'fine_label')

SourceLike = Union[DataSource, datasets.Dataset, datasets.IterableDataset, str, Dict[str, Any]]


def as_source(source: SourceLike) -> Union[DataSource, datasets.Dataset, datasets.IterableDataset]:
    if isinstance(source, (DataSource, datasets.Dataset, datasets.IterableDataset)):
        return source
    if isinstance(source, str):
        return DataSource(path=source)
    if isinstance(source, dict):
        return DataSource(**source)
    raise UserError(f'cannot use {type(source).__name__} as a data source; pass a path, a Hub id or a Dataset.')


# --- sources, resolved once ----------------------------------------------------------------------

RESOLUTIONS: collections.Counter = collections.Counter()  # (path, name, split, streaming) -> times resolved
_RESOLVED: Optional[Dict[tuple, Any]] = None  # while a run holds its sources: their datasets, by key


def _key(source: DataSource) -> tuple:
    return (source.path, source.name, source.split, bool(source.streaming))


@contextmanager
def sources_of_run(index_root: Union[str, os.PathLike], sources: Dict[str, Any], state=None):
    """Resolve each source once for a whole run; every ``load_source`` of it inside gives that dataset.

    An image folder is listed once (``os.scandir``, no per-file work) into an index saved under
    ``index_root/NAME`` (``index.arrow``: the file list and labels; ``source.json``), which every
    process then opens memory-mapped. Other sources go through ``datasets`` once each. The index is
    made again by each ``run`` invocation, so a folder changed since the last one is seen, and the
    pairing check of ``check_pairing`` then refuses labels made before the change.
    """
    global _RESOLVED
    main = state is None or state.is_main_process
    resolved: Dict[tuple, Any] = {}
    indexed: Dict[Path, str] = {}  # folder -> the index that lists it (two splits of one folder share it)
    index_root = Path(index_root)
    for name, source in sources.items():
        source = as_source(source) if source is not None else None
        if not isinstance(source, DataSource) or source.streaming or _key(source) in resolved:
            continue
        folder = _plain_image_folder(source)
        if folder is None:
            continue
        folder = folder.resolve()
        if folder in indexed:
            if (index_root / indexed[folder]).is_dir():
                RESOLUTIONS[_key(source)] += 1
                resolved[_key(source)] = _folder_split(open_index(index_root / indexed[folder]), source)
            continue
        indexed[folder] = name
        if main:
            try:
                ds = _index_image_folder(folder)
            except _NotPlain:
                ds = None
            (index_root / f'{name}.skipped').unlink(missing_ok=True)
            if ds is None:
                index_root.mkdir(parents=True, exist_ok=True)
                (index_root / f'{name}.skipped').write_text('read by datasets\n')
        if main and ds is not None:
            from .files import replace_dir
            tmp = index_root / f'.{name}.tmp'
            shutil.rmtree(tmp, ignore_errors=True)
            save_index(ds, tmp)
            (tmp / 'source.json').write_text(json.dumps({'source': dataclasses.asdict(source), 'rows': len(ds),
                                                         'folder': str(folder)}, indent=2))
            replace_dir(tmp, index_root / name)
        if state is not None:
            state.wait_for_everyone()
        if (index_root / f'{name}.skipped').is_file():
            continue  # datasets reads it, once, at its first load_source below
        RESOLUTIONS[_key(source)] += 1
        resolved[_key(source)] = _folder_split(open_index(index_root / name), source)
    before, _RESOLVED = _RESOLVED, resolved
    try:
        yield
    finally:
        _RESOLVED = before


INDEX_FILE = 'index.arrow'


def save_index(ds: datasets.Dataset, directory: Union[str, os.PathLike]) -> Path:
    """A folder's index as one Arrow file (file paths, labels, features), its images left where they are.

    ``save_to_disk`` would copy every image's bytes into the file; the index only lists them.
    """
    from datasets.arrow_writer import ArrowWriter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    writer = ArrowWriter(features=ds.features, path=str(directory / INDEX_FILE), embed_local_files=False)
    for table in ds.with_format('arrow').iter(100_000):
        writer.write_table(table)
    writer.finalize()
    writer.close()
    return directory


def open_index(directory: Union[str, os.PathLike]) -> datasets.Dataset:
    """A saved index, memory-mapped: opening costs no pass over its rows."""
    return datasets.Dataset.from_file(str(Path(directory) / INDEX_FILE))


def _plain_image_folder(source: DataSource) -> Optional[Path]:
    """The folder, when a source is an image folder that the scandir index reads exactly as
    ``datasets`` does: no metadata file, no split-named folder or file, no other data files."""
    path = Path(source.path).expanduser()
    if source.name or not path.is_dir() or _is_saved_dataset(path):
        return None
    return path


_SPLIT_WORDS = tuple(w for words in datasets.data_files.SPLIT_KEYWORDS.values() for w in words)
_DATA_FILE_SUFFIXES = ('.parquet', '.arrow', '.csv', '.json', '.jsonl', '.tsv', '.txt', '.tar', '.zip', '.gz')


class _NotPlain(Exception):
    pass


def _index_image_folder(root: Path, progress: bool = True) -> datasets.Dataset:
    """An image folder as ``load_dataset('imagefolder')`` would give it, listed with ``os.scandir``.

    Files are ordered by path, hidden ones (``.`` or ``__``) are skipped, a ``label`` ClassLabel
    comes from the parent folder names when there are two or more at one depth. Raises
    ``_NotPlain`` for folders that ``datasets`` reads in other ways (metadata files, split names).
    """
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = {e.lower() for e in ImageFolder.EXTENSIONS}
    metadata = set(getattr(ImageFolder, 'METADATA_FILENAMES', ('metadata.csv', 'metadata.jsonl', 'metadata.parquet')))
    root = root.resolve()
    paths: List[str] = []
    bar = progress_bar(desc=f'indexing {root.name}', unit='files', delay=1.0,
                       disable=not (progress and datasets.is_progress_bar_enabled()))  # --no-progress: datasets' off
    try:
        stack = [(str(root), 0)]
        while stack:
            folder, depth = stack.pop()
            with os.scandir(folder) as entries:
                for entry in entries:
                    name = entry.name
                    if name.startswith(('.', '__')):
                        continue
                    low = name.lower()
                    if depth < 2 and low.startswith(_SPLIT_WORDS):
                        raise _NotPlain(f'{entry.path} looks like a split name')
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((entry.path, depth + 1))
                    elif name in metadata or low.endswith(_DATA_FILE_SUFFIXES):
                        raise _NotPlain(f'{entry.path} is a metadata or data file')
                    elif os.path.splitext(low)[1] in extensions:
                        paths.append(entry.path)
            bar.update(len(paths) - bar.n)
    finally:
        bar.close()  # also when datasets reads the folder instead: no stray '0files' line
    odd = [p for p in paths if not _utf8(p)]
    if odd:  # Arrow strings are UTF-8: such a name cannot be listed, so its file is left out, and said
        paths = [p for p in paths if _utf8(p)]
        shown = os.fsencode(os.path.relpath(min(odd), root)).decode('utf-8', 'backslashreplace')
        if not paths:
            raise UserError(f'no image of {root} can be read: the names of its {len(odd)} image file(s) are not '
                            f'valid UTF-8, such as "{shown}"; rename them (or the folders above them).')
        warnings.warn(f'{root}: left out {len(odd)} image file(s) whose name is not valid UTF-8, such as '
                      f'"{shown}"; rename them to include them.', stacklevel=2)
    if not paths:
        raise UserError(f'no images or data files found in {root}.')
    paths.sort()
    arr = pa.array(paths, pa.string())
    images = pa.StructArray.from_arrays([pa.nulls(len(paths), pa.binary()), arr], names=['bytes', 'path'])
    columns = {'image': images}
    features = {'image': datasets.Image()}
    dirs = [os.path.dirname(p) for p in paths]
    depths = {d.count(os.sep) for d in set(dirs)}
    names = sorted({os.path.basename(d) for d in set(dirs)})
    if len(names) > 1 and len(depths) == 1:
        lookup = {n: i for i, n in enumerate(names)}
        columns['label'] = pa.array([lookup[os.path.basename(d)] for d in dirs], pa.int64())
        features['label'] = datasets.ClassLabel(names=names)
    table = pa.table(columns)
    return datasets.Dataset(datasets.table.InMemoryTable(table),
                            info=datasets.DatasetInfo(features=datasets.Features(features)))


def _utf8(path: str) -> bool:
    try:
        path.encode('utf-8')
    except UnicodeEncodeError:  # undecodable bytes of a file name, as os.scandir gives them (surrogateescape)
        return False
    return True


def _folder_split(ds: datasets.Dataset, source: DataSource) -> datasets.Dataset:
    name = re.split(r'[\[+]', source.split, maxsplit=1)[0]
    if name != 'train':
        raise UserError(f'bad split {source.split!r} for {source.path}: Unknown split "{name}". '
                        "Should be one of ['train'].")
    return _split_of(ds, source.split)


def load_source(source: SourceLike) -> Union[datasets.Dataset, datasets.IterableDataset]:
    """The dataset split that a source names, not yet decoded.

    Inside ``sources_of_run`` a source the run resolved comes back as that same dataset.
    """
    source = as_source(source)
    if not isinstance(source, DataSource):
        return source
    if _RESOLVED is None:
        return _resolve(source)
    if _key(source) not in _RESOLVED:
        _RESOLVED[_key(source)] = _resolve(source)
    return _RESOLVED[_key(source)]


def _resolve(source: DataSource) -> Union[datasets.Dataset, datasets.IterableDataset]:
    RESOLUTIONS[_key(source)] += 1
    folder = None if source.streaming else _plain_image_folder(source)
    if folder is not None:
        try:
            return _folder_split(_index_image_folder(folder), source)
        except _NotPlain:
            pass  # datasets reads it
    path = Path(source.path).expanduser()
    if _is_saved_dataset(path):
        return _split_of(datasets.load_from_disk(str(path)), source.split)
    # a Hub id is ORG/NAME; more parts, or a first part that is a local folder, is a local path
    parts = source.path.split('/')
    looks_local = (source.path.startswith(('.', '/', '~')) or path.exists() or len(parts) > 2
                   or (len(parts) == 2 and Path(parts[0]).is_dir()))
    if looks_local and not path.exists():
        raise UserError(f'data path {source.path} does not exist.')
    try:
        return datasets.load_dataset(
            str(path) if looks_local else source.path, source.name, split=source.split,
            streaming=source.streaming)
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as e:
        if looks_local:
            raise UserError(f'no images or data files found in {source.path}: {_first_line(e)}') from e
        raise UserError(
            f'cannot load dataset {source.path!r} ({_first_line(e)}); check the id, or when offline set '
            'HF_DATASETS_OFFLINE=1 with the dataset in the cache, or pass a local folder.') from e
    except ConnectionError as e:
        if datasets.config.HF_HUB_OFFLINE:
            raise UserError(
                f'dataset {source.path!r} is not in the local cache and offline mode is on (HF_HUB_OFFLINE or '
                'HF_DATASETS_OFFLINE); download it once online, point HF_HOME (or HF_DATASETS_CACHE) at a cache '
                'that holds it, or pass a local folder.') from e
        raise UserError(
            f'cannot reach the Hub for dataset {source.path!r}; set HF_DATASETS_OFFLINE=1 to use the cache, '
            'or pass a local folder.') from e
    except ValueError as e:
        if 'corresponds to no data' in str(e):
            raise UserError(f'split {source.split!r} of {source.path} holds no rows; '
                            'check the path and the split.') from e
        if any(w in str(e).lower() for w in ('split', 'instruction', 'slice')):
            raise UserError(f'bad split {source.split!r} for {source.path}: {_first_line(e)}') from e
        raise


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / 'dataset_dict.json').is_file() or (path / 'state.json').is_file())


def _split_of(saved, split: str) -> datasets.Dataset:
    # load_from_disk has no split argument; apply the same slicing syntax load_dataset takes
    name = re.split(r'[\[+]', split, maxsplit=1)[0]
    if isinstance(saved, datasets.DatasetDict):
        if name not in saved:
            raise UserError(f'split {name!r} not in the saved dataset; it has {", ".join(saved)}.')
        ds = saved[name]
    else:
        ds = saved
    if name == split:
        return ds
    try:
        instructions = datasets.ReadInstruction.from_spec(split).to_absolute({name: len(ds)})
    except (ValueError, AssertionError) as e:
        raise UserError(f'bad split {split!r}: {_first_line(e)}') from e
    rows = [i for ins in instructions for i in range(ins.from_, ins.to)]
    return ds.select(rows)


def _column_types(ds) -> Dict[str, Any]:
    return dict(ds.features or {})


def _find_column(ds, override: Optional[str], what: str, conventional: Sequence[str], feature_type,
                 missing_hint: str) -> str:
    """The column named, else a conventional name, else the first of ``feature_type``; one line otherwise."""
    features = _column_types(ds)
    columns = list(ds.column_names or features)
    if override:
        if override not in columns:
            raise UserError(f'{what} column {override!r} not found; the columns are: {", ".join(columns)}.')
        return override
    name = next((c for c in conventional if c in columns), None)
    name = name or next((c for c, f in features.items() if isinstance(f, feature_type)), None)
    if name is None:
        raise UserError(f'no {what} column found; the columns are: {", ".join(columns)}. {missing_hint}')
    return name


def image_column_of(ds, override: Optional[str] = None) -> str:
    """The image column: the one named, a conventional name, or the first Image feature."""
    return _find_column(ds, override, 'image', IMAGE_COLUMNS, datasets.Image, 'Set image_column.')


def label_column_of(ds, override: Optional[str] = None, image_column: Optional[str] = None) -> str:
    """The label column: the one named, a conventional name, or the first ClassLabel (never the image column)."""
    name = _find_column(ds, override, 'label', LABEL_COLUMNS, datasets.ClassLabel,
                        'Set label_column, or for an image folder give it one subfolder per class: with only one, '
                        'it has no labels.')
    if name == image_column:
        raise UserError(f'{name!r} is both the image and the label column; name the images with image_column '
                        '(--image-column) and the labels with label_column (--label-column).')
    features = _column_types(ds)
    feature = features.get(name)
    if isinstance(feature, datasets.Value) and feature.dtype in ('string', 'large_string'):
        raise UserError(
            f'label column {name!r} holds strings; make it a ClassLabel (dataset.class_encode_column({name!r})) '
            'or use an image folder with one subfolder per class.')
    return name


def label_names_of(ds, label_column: str) -> Optional[List[str]]:
    feature = _column_types(ds).get(label_column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def num_classes_of(ds, label_column: str) -> int:
    names = label_names_of(ds, label_column)
    if names:
        return len(names)
    labels = ds[label_column]
    if len(labels) == 0:
        raise UserError('the labeled set is empty.')
    return int(max(labels)) + 1


def check_labels(ds, label_column: str, num_classes: int, what: str = 'labeled') -> None:
    """Labels must be class indices in [0, num_classes)."""
    labels = np.asarray(ds[label_column])
    if labels.size == 0:
        raise UserError(f'the {what} set is empty.')
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f'{what} labels in {label_column!r} are not integers (found {labels.dtype}).')
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise UserError(
            f'{what} labels must be in [0, {num_classes - 1}], found {low}..{high} in {label_column!r}; '
            'drop unlabeled rows (-1) or fix the class count.')


def check_output_outside(output: Union[str, os.PathLike], source: Any, what: str) -> None:
    """An output inside a local input folder would be read back as input, one above it could overwrite it: refuse both."""
    source = as_source(source) if source is not None else None
    if not isinstance(source, DataSource):
        return
    root = Path(source.path).expanduser()
    if not root.is_dir():
        return
    out, root = Path(output).expanduser().resolve(), root.resolve()
    if out == root or root in out.parents:
        raise UserError(f'the output {output} lies inside the {what} folder {source.path}, so its files would be '
                        'read as data; choose an output outside it.')
    if out in root.parents:
        raise UserError(f'the output {output} contains the {what} folder {source.path}, and writing there could '
                        'replace or clean files of the data; choose an output beside it.')


IDENTITY_SAMPLE = 16  # rows whose bytes go into a source's identity


def source_identity(ds, image_column: str, source: Optional[SourceLike] = None) -> Dict[str, Any]:
    """What proves that a later load is the set that was labeled, row for row.

    The row count, a hash of every row's file name (relative to a local source's folder, so a
    moved copy still matches), a hash of the bytes of a few rows spread over the set and one of
    its first rows, plus where it came from (a resolved local path or the Hub id). A stream has
    no stable fingerprint and no length: its identity is the hash of its first rows, and the
    labeler adds the row count when it has seen them all.
    """
    where, root = None, None
    source = as_source(source) if source is not None else None
    if isinstance(source, DataSource):
        path = Path(source.path).expanduser()
        if path.exists():
            root = where = str(path.resolve())
        else:
            where = source.path
    plain = undecoded(ds.select_columns([image_column]), image_column)
    if isinstance(ds, datasets.IterableDataset):
        import itertools
        head = [row[image_column] for row in itertools.islice(iter(plain), IDENTITY_SAMPLE)]
        return {'where': where, 'rows': None, 'head_sha256': _bytes_hash(head)}
    n = len(ds)
    column = plain.with_format('arrow')[:].column(0)
    names = hashlib.sha256()
    paths = pc.struct_field(column, 'path').to_pylist() if pa.types.is_struct(column.type) else [None] * n
    prefix = root + os.sep if root else None
    for p in paths:
        p = p or ''
        if prefix and p.startswith(prefix):
            p = p[len(prefix):]
        names.update(p.encode('utf-8', 'surrogateescape') + b'\0')
    picks = sorted({int(i) for i in np.linspace(0, n - 1, num=min(IDENTITY_SAMPLE, n))}) if n else []
    return {'where': where, 'rows': n, 'names_sha256': names.hexdigest()[:16],
            'sample_sha256': _bytes_hash([plain[i][image_column] for i in picks]),
            'head_sha256': _bytes_hash([plain[i][image_column] for i in range(min(IDENTITY_SAMPLE, n))])}


HASHED_BYTES_MAX = 64 << 20  # an image file's bytes that go into its identity hash, at most


def _regular_file(path: str) -> str:
    """``path`` when it is a regular file (a link to one counts): a FIFO would block a read and a
    device such as /dev/zero never ends, so both are refused like an undecodable image."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f'{path} is not a regular file')
    return path


def _bytes_hash(values: Sequence[Any]) -> str:
    """sha256 over the encoded bytes of image values (embedded bytes, else the file's, at most
    HASHED_BYTES_MAX of them, and nothing of a file that is not a regular one)."""
    digest = hashlib.sha256()
    for value in values:
        data = value.get('bytes') if isinstance(value, dict) else None
        if data is None and isinstance(value, dict) and value.get('path'):
            try:
                with open(_regular_file(value['path']), 'rb') as f:
                    data = f.read(HASHED_BYTES_MAX)
            except OSError:
                data = b''
        digest.update(hashlib.sha256(data or b'').digest())
    return digest.hexdigest()[:16]


def identity_mismatch(then: Dict[str, Any], now: Dict[str, Any]) -> Optional[str]:
    """Why two identities are not the same rows, or None when they are (only what both record counts)."""
    def both(key):
        return then.get(key) is not None and now.get(key) is not None

    if both('rows') and then['rows'] != now['rows']:
        return f'it has {now["rows"]} rows, and {then["rows"]} when it was labeled'
    if both('names_sha256') and then['names_sha256'] != now['names_sha256']:
        return 'its files are not the ones that were labeled (names or order differ)'
    for key in ('sample_sha256', 'head_sha256'):
        if both(key) and then[key] != now[key]:
            return 'its images differ from the ones that were labeled'
    return None


def undecoded(ds, image_column: str):
    """The dataset with its image column left as bytes/paths, decoded only in our transform."""
    feature = _column_types(ds).get(image_column)
    if isinstance(feature, datasets.Image) and not feature.decode:
        return ds
    return ds.cast_column(image_column, datasets.Image(decode=False))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB; 16-bit and float images are scaled, not clipped."""
    if img.mode == 'RGB':
        return img
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith('I;16') else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert('RGB')
    if img.mode == 'P' and 'transparency' in img.info:
        img = img.convert('RGBA')
    if img.mode in ('RGBA', 'LA', 'PA'):
        rgba = img.convert('RGBA')
        background = Image.new('RGB', rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel('A'))
        return background
    return img.convert('RGB')


def decode_image(value: Any) -> Optional[Image.Image]:
    """An RGB image from a datasets image value, or None when it cannot be decoded."""
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict) and value.get('bytes') is not None:
            img = Image.open(io.BytesIO(value['bytes']))
        elif isinstance(value, dict) and value.get('path'):
            img = Image.open(_regular_file(value['path']))
        elif isinstance(value, str):
            img = Image.open(_regular_file(value))
        elif isinstance(value, (bytes, bytearray)):
            img = Image.open(io.BytesIO(value))
        else:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            img.load()
        if min(img.size) < 1:
            return None
        return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, TypeError, EOFError):
        # OSError covers truncated files and PIL's UnidentifiedImageError
        return None


class BatchNormalize:
    """ToTensor's and Normalize's arithmetic on a uint8 NCHW batch, once, on its device.

    ``x / 255`` then ``(x - mean) / std`` in float32, as torchvision's ``to_tensor`` and
    ``normalize`` do image by image, so the result is bit for bit theirs; channels_last by default.
    """

    def __init__(self, mean, std, channels_last: bool = True):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        x = x.float().div_(255)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


class EvalTransform:
    """timm's eval transform (resize the shorter side, center crop, ToTensor, Normalize), batched.

    The same PIL resize and crop as ``create_transform(**data_config)``, but it returns uint8
    CHW: ``normalize`` then does ToTensor's and Normalize's arithmetic once on the whole batch,
    on the model's device, in channels_last, and DataLoader workers send a quarter of the bytes.
    The input is bit for bit timm's. (Resampling only the box that the crop keeps, or decoding
    JPEGs at reduced size with PIL's ``draft``, costs less but moves pixels, so labels would no
    longer match a timm forward.) ``of`` gives timm's own transform back for configs this does
    not cover.
    """

    def __init__(self, short_side: int, crop: Sequence[int], resample: int, mean, std):
        self.short_side = short_side
        self.crop_h, self.crop_w = crop
        self.resample = resample
        self.normalize = BatchNormalize(mean, std)  # a uint8 batch as the model input, channels_last

    @classmethod
    def of(cls, data_config: Dict[str, Any]) -> Callable:
        """The fast transform for a timm eval config, or timm's transform where they would differ."""
        import timm
        from torchvision import transforms as T

        timm_tf = timm.data.create_transform(**data_config)
        steps = list(getattr(timm_tf, 'transforms', []))
        kinds = [type(t).__name__ for t in steps]
        if kinds != ['Resize', 'CenterCrop', 'MaybeToTensor', 'Normalize']:
            return timm_tf
        resize, crop, _, norm = steps
        size = resize.size if isinstance(resize.size, int) else (resize.size[0] if len(resize.size) == 1 else None)
        crop_hw = tuple(crop.size)
        if size is None or resize.max_size is not None or size < max(crop_hw):
            return timm_tf  # a two-sided resize, or a crop that pads
        resample = T.functional.pil_modes_mapping.get(resize.interpolation)
        if resample is None:
            return timm_tf
        return cls(size, crop_hw, resample, norm.mean.tolist(), norm.std.tolist())

    def __call__(self, img: Image.Image) -> torch.Tensor:
        # torchvision's Resize(int) output size (skipped when equal) and CenterCrop offsets
        w, h = img.size
        if w <= h:
            new_w, new_h = self.short_side, int(self.short_side * h / w)
        else:
            new_w, new_h = int(self.short_side * w / h), self.short_side
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), self.resample)
        top = int(round((new_h - self.crop_h) / 2.0))
        left = int(round((new_w - self.crop_w) / 2.0))
        out = img.crop((left, top, left + self.crop_w, top + self.crop_h))
        return torch.from_numpy(np.asarray(out, dtype=np.uint8).transpose(2, 0, 1).copy())


def image_transform_fn(image_column: str, transform: Callable, label_column: Optional[str] = None):
    """A ``with_transform`` function: decode, convert to RGB and transform each image lazily.

    Undecodable images become None; ``collate`` drops and counts them.
    """
    def fn(batch):
        images = [decode_image(v) for v in batch[image_column]]
        out = {'pixel_values': [transform(img) if img is not None else None for img in images]}
        if label_column is not None:
            out['label'] = batch[label_column]
        return out
    return fn


def _sample_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], 'little')


@contextmanager
def _seeded(seed: int):
    """Seed python, numpy and torch for one batch of augmentation, then restore their state.

    Augmentation then depends only on (run seed, epoch, rows), so a resumed run sees the
    same noise as an uninterrupted one, whichever process or worker makes the batch.
    """
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class ImageRows(torch.utils.data.Dataset):
    """Rows of a Hugging Face dataset as transformed images (+ labels) and their row index.

    ``__getitems__`` fetches a whole batch from the dataset at once, so the lazy
    ``with_transform`` runs once per batch.
    """

    def __init__(
            self,
            ds: datasets.Dataset,
            image_column: str,
            transform: Callable,
            label_column: Optional[str] = None,
            seed: int = 0,
    ):
        self.image_column = image_column
        self.label_column = label_column
        columns = [image_column] + ([label_column] if label_column else [])
        ds = undecoded(ds.select_columns(columns), image_column)
        self.ds = ds.with_transform(image_transform_fn(image_column, transform, label_column))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, indices: Sequence[int]) -> Dict[str, list]:
        indices = [int(i) for i in indices]
        with _seeded(_sample_seed(self.seed, self.epoch, tuple(indices))):
            batch = self.ds[indices]
        batch['index'] = indices
        return batch

    def __getitem__(self, index: int) -> Dict[str, list]:
        return self.__getitems__([index])


class PseudoRows(torch.utils.data.Dataset):
    """Pseudo-labeled rows: each points at a row of the unlabeled set and carries its target.

    Targets are dense probability vectors (soft labels, from ``probs`` or ``topk_idx``/``topk_prob``)
    or class indices when ``hard`` is set. ``min_length`` repeats the rows (position i is row
    i mod n) so that an epoch holds at least that many, whatever selection kept.
    """

    def __init__(self, pseudo: datasets.Dataset, images: ImageRows, num_classes: int, hard: bool = False,
                 min_length: int = 0):
        self.pseudo = pseudo
        self.images = images
        self.num_classes = num_classes
        self.hard = hard
        self.rows = len(pseudo)
        self.length = max(self.rows, min_length) if self.rows else 0

    def set_epoch(self, epoch: int) -> None:
        self.images.set_epoch(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitems__(self, indices: Sequence[int]) -> Dict[str, list]:
        rows = self.pseudo[[int(i) % self.rows for i in indices]]
        batch = self.images.__getitems__(rows['index'])
        batch['label'] = list(self._targets(rows))
        return batch

    def __getitem__(self, index: int):
        return self.__getitems__([index])

    def _targets(self, rows) -> torch.Tensor:
        if self.hard:
            return torch.tensor(rows['label'], dtype=torch.long)
        if 'probs' in rows:
            return torch.tensor(np.asarray(rows['probs'], dtype=np.float32))
        dense = torch.zeros(len(rows['topk_idx']), self.num_classes)
        idx = torch.tensor(np.asarray(rows['topk_idx'], dtype=np.int64))
        val = torch.tensor(np.asarray(rows['topk_prob'], dtype=np.float32))
        dense.scatter_(1, idx, val)
        # the mass outside the top-k is spread evenly, so each target still sums to one
        rest = (1.0 - dense.sum(1, keepdim=True)).clamp(min=0) / max(self.num_classes - idx.shape[1], 1)
        return torch.where(dense > 0, dense, rest)


@dataclass
class Batch:
    pixel_values: torch.Tensor
    label: Optional[torch.Tensor]
    index: torch.Tensor
    skipped: List[int]


def collate(rows: Dict[str, list]) -> Batch:
    """Stack a fetched batch, dropping (and naming) the rows whose image did not decode."""
    keep = [i for i, x in enumerate(rows['pixel_values']) if x is not None]
    skipped = [rows['index'][i] for i in range(len(rows['index'])) if i not in set(keep)]
    if keep:
        pixels = torch.stack([rows['pixel_values'][i] for i in keep])
    else:
        pixels = torch.empty(0)
    label = None
    if 'label' in rows:
        labels = [rows['label'][i] for i in keep]
        if labels and isinstance(labels[0], torch.Tensor):
            label = torch.stack(labels)
        else:
            label = torch.tensor(labels, dtype=torch.long)
    index = torch.tensor([rows['index'][i] for i in keep], dtype=torch.long)
    return Batch(pixels, label, index, skipped)


def source_columns(source) -> Dict[str, Optional[str]]:
    if isinstance(source, DataSource):
        return {'image': source.image_column, 'label': source.label_column}
    return {'image': None, 'label': None}


def read_pseudo(pseudo_dir: Path) -> tuple:
    """The selected pseudo labels of a label directory, and its stats."""
    stats, files = labels_files(Path(pseudo_dir))
    if stats.get('rows_after') == 0:
        raise UserError(_no_rows(pseudo_dir, stats))
    table = datasets.load_dataset('parquet', data_files=[str(f) for f in files], split='train')
    if len(table) == 0:
        raise UserError(_no_rows(pseudo_dir, stats))
    return table, stats


def _no_rows(pseudo_dir, stats: Dict[str, Any]) -> str:
    """Why a label directory holds no rows, as far as its stats.json tells."""
    failed = stats.get('failed_count') or 0
    if not stats.get('rows_labeled') and failed:
        return (f'{pseudo_dir} holds no pseudo-labeled rows: none of the {failed} images it was made from could be '
                f'decoded (they are listed in {Path(pseudo_dir) / "stats.json"}); check those files, the path and '
                'the image column, then label again.')
    threshold = stats.get('threshold')
    if isinstance(threshold, (int, float)) and threshold > 0:
        return f'{pseudo_dir} holds no pseudo-labeled rows; lower the threshold ({threshold:g}) and label again.'
    return f'{pseudo_dir} holds no pseudo-labeled rows; label again.'


def check_pseudo_values(pseudo_dir, table, num_classes: int, unlabeled_rows: int) -> None:
    """Refuse a label set whose values no labeler writes: an index outside the unlabeled set, a class
    out of range, a probability that is not finite or outside [0, 1], or rows that do not sum to 1."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = table.data.table if hasattr(table.data, 'table') else table.data

    def refuse(what: str, rows) -> None:
        raise UserError(f'{pseudo_dir} holds {what} (row {int(np.flatnonzero(rows)[0])} of its data/); '
                        'label again with `noisystudent label`.')

    def column(name: str) -> np.ndarray:
        return t.column(name).combine_chunks().to_numpy(zero_copy_only=False)

    index, label = column('index'), column('label')
    if ((index < 0) | (index >= unlabeled_rows)).any():
        refuse(f'a row index outside the unlabeled set of {unlabeled_rows} rows', (index < 0) | (index >= unlabeled_rows))
    if ((label < 0) | (label >= num_classes)).any():
        refuse(f'a class outside 0..{num_classes - 1}', (label < 0) | (label >= num_classes))
    name = 'probs' if 'probs' in t.column_names else 'topk_prob'
    probs = t.column(name).combine_chunks()
    if isinstance(probs, pa.ChunkedArray):
        probs = probs.combine_chunks()
    lengths = pc.list_value_length(probs).to_numpy(zero_copy_only=False)
    width = num_classes if name == 'probs' else int(lengths.max(initial=0))
    if (lengths != width).any():
        refuse(f'a {name} list of another length than {width}', lengths != width)
    values = probs.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, max(width, 1))
    bad = ~np.isfinite(values).all(axis=1) | (values < 0).any(axis=1) | (values > 1 + 1e-6).any(axis=1)
    if bad.any():
        refuse('a probability that is not finite or not in [0, 1]', bad)
    sums = values.sum(axis=1)
    off = np.abs(sums - 1) > 1e-3 if name == 'probs' else sums > 1 + 1e-3
    if off.any():
        refuse(f'probabilities that sum to {sums[off][0]:.4g}, not 1', off)
    if name == 'topk_prob':
        idx = column('topk_idx')
        flat = np.concatenate(idx) if idx.dtype == object and len(idx) else np.asarray(idx).ravel()
        if flat.size and ((flat < 0) | (flat >= num_classes)).any():
            raise UserError(f'{pseudo_dir} holds a top-k class outside 0..{num_classes - 1}; '
                            'label again with `noisystudent label`.')


def unlabeled_of(pseudo_dir, stats: Dict[str, Any]) -> DataSource:
    """The unlabeled source a label directory names: by its resolved path where it has one."""
    record = dict(stats.get('source') or {})
    if not record.get('path'):
        raise UserError(f'{pseudo_dir}/stats.json does not say which unlabeled set it labels; '
                        'pass it with --unlabeled-data.')
    resolved = record.pop('resolved', None)
    if resolved:
        record['path'] = resolved
    return DataSource(**{k: v for k, v in record.items() if k in DataSource.__dataclass_fields__})


def check_pairing(pseudo_dir: Path, stats: Dict[str, Any], ds, image_column: str, source) -> None:
    """Refuse pseudo labels whose row indices would point at other images than the ones labeled."""
    then = stats.get('source_identity')
    if not then:
        warnings.warn(f'{pseudo_dir} records no identity of the set it labeled (made by an older version), so '
                      'the pairing of its labels with the unlabeled images is not checked.', stacklevel=2)
        return
    now = source_identity(ds, image_column, source)
    why = identity_mismatch(then, now)
    if why is None:
        return
    shown = getattr(as_source(source), 'path', None) or 'the given dataset'
    stage = pseudo_dir.name
    redo = (f'rerun the run with --restart-from {stage}' if re.fullmatch(r'iter\d+-labels', stage)
            else 'label it again with `noisystudent label`, or pass the set it was labeled from with --unlabeled-data')
    raise UserError(f'the unlabeled set {shown} does not match the pseudo labels in {pseudo_dir}, which were made '
                    f'from {then.get("where")}: {why}; {redo}.')


# DataLoader workers start again at every pass over a loader. Measured here (2 cores, 64 digits at
# 32 px a batch): a one-batch pass takes 11-15 ms in the process and 56-120 ms with one worker, so
# with ``short_pass_in_process`` a pass shorter than this many batches (a small labeled set,
# repeated pass after pass) loads in the process instead
MIN_WORKER_PASS = 20


def make_loader(rows, batch_size, shuffle, num_workers, drop_last=False, short_pass_in_process=False):
    if short_pass_in_process and math.ceil(len(rows) / batch_size) < MIN_WORKER_PASS:
        num_workers = 0
    # An own generator: starting an iterator must not draw from the global RNG, or a resumed
    # run (which starts one mid-epoch) would shift every dropout mask after it.
    return torch.utils.data.DataLoader(
        rows, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, num_workers=num_workers,
        drop_last=drop_last, generator=torch.Generator().manual_seed(0))



def eval_loader(source: SourceLike, data_config, batch_size, num_workers, num_classes, short_pass_in_process=False):
    ds = load_source(source)
    if isinstance(ds, datasets.IterableDataset):
        raise UserError('evaluation data cannot be streamed; drop streaming for the eval split.')
    cols = source_columns(as_source(source))
    image_col = image_column_of(ds, cols['image'])
    label_col = label_column_of(ds, cols['label'], image_col)
    names = label_names_of(ds, label_col)
    if names and len(names) != num_classes:
        # image folders number classes by sorted folder name: a missing class shifts every index
        raise UserError(f'the eval data has {len(names)} classes ({label_col!r}) but the model has {num_classes}; '
                        'evaluate on data with the same classes (an image folder needs all class folders).')
    check_labels(ds, label_col, num_classes, what='eval')
    import timm
    rows = ImageRows(ds, image_col, timm.data.create_transform(**data_config), label_column=label_col)
    return make_loader(rows, batch_size, shuffle=False, num_workers=num_workers,
                       short_pass_in_process=short_pass_in_process)


def source_record(source, full: bool = False) -> Optional[Dict[str, Any]]:
    """A source as a JSON record (path, name, split; ``full`` adds columns and streaming); None in memory."""
    source = as_source(source) if source is not None else None
    if not isinstance(source, DataSource):
        return None
    keys = ('path', 'name', 'split') + (('image_column', 'label_column', 'streaming') if full else ())
    return {k: getattr(source, k) for k in keys}


def labeled_set(source: SourceLike):
    """A labeled source loaded and checked: the dataset, its image and label columns, names and class count."""
    src = as_source(source)
    ds = load_source(src)
    if isinstance(ds, datasets.IterableDataset):
        raise UserError('the labeled set cannot be streamed; it is read many times.')
    cols = source_columns(src)
    image_col = image_column_of(ds, cols['image'])
    label_col = label_column_of(ds, cols['label'], image_col)
    num_classes = num_classes_of(ds, label_col)
    check_labels(ds, label_col, num_classes)
    return ds, image_col, label_col, label_names_of(ds, label_col), num_classes


@dataclass
class TrainRows:
    """What a stage trains on: ``main`` batches of ``main_batch`` (a student's pseudo-labeled rows, or a
    teacher's labeled rows) and, for a student, ``labeled`` batches of ``side_batch`` beside them."""
    main: Any
    main_batch: int
    labeled: 'ImageRows'
    side_batch: Optional[int]
    hard: bool
    pseudo_rows: int = 0
    # the augmented images come as uint8 (timm's prefetcher transforms); this makes them model input
    normalize: Optional[BatchNormalize] = None

    @property
    def images_per_step(self) -> int:
        return self.main_batch + (self.side_batch or 0)


def train_rows(labeled_ds, image_col: str, label_col: str, num_classes: int, data_config: Dict[str, Any],
               batch_size: int, seed: int, pseudo: Optional[os.PathLike] = None, unlabeled: Optional[SourceLike] = None,
               randaugment: Optional[str] = None, unlabeled_ratio: int = 1, unaugmented: bool = False) -> TrainRows:
    """A teacher's rows (crop/flip, or the eval transform when ``unaugmented``), or a student's: its
    pseudo labels, paired with the unlabeled set they were made from, and the labeled rows, all noised."""
    from . import augment

    # augmented images stay uint8 until the whole batch is normalized at once (see BatchNormalize):
    # at 32 px, one thread: ToTensor + Normalize image by image 30 us an image, uint8 + this 15 us
    normalize = BatchNormalize(data_config['mean'], data_config['std'])
    if pseudo is None:
        import timm
        if unaugmented:
            light, normalize = timm.data.create_transform(**data_config), None
        else:
            light = augment.teacher_transform(data_config, uint8=True)
        rows = ImageRows(labeled_ds, image_col, light, label_column=label_col, seed=seed)
        return TrainRows(rows, batch_size, rows, None, hard=True, normalize=normalize)
    pseudo_table, stats = read_pseudo(Path(pseudo))
    src = as_source(unlabeled) if unlabeled is not None else unlabeled_of(pseudo, stats)
    unlabeled_ds = load_source(src)
    if isinstance(unlabeled_ds, datasets.IterableDataset):
        raise UserError('student training needs random access to the unlabeled set; '
                        'save it to disk (or drop streaming) for training.')
    un_image_col = image_column_of(unlabeled_ds, source_columns(src)['image'])
    check_pairing(Path(pseudo), stats, unlabeled_ds, un_image_col, src)
    teacher_classes = int(stats.get('num_classes', num_classes))
    if teacher_classes != num_classes:
        raise UserError(f'the pseudo labels have {teacher_classes} classes but the labeled set has '
                        f'{num_classes}; label with a teacher trained on this labeled set.')
    check_pseudo_values(pseudo, pseudo_table, num_classes, len(unlabeled_ds))
    noisy = augment.student_transform(data_config, randaugment, uint8=True)
    un_rows = ImageRows(unlabeled_ds, un_image_col, noisy, seed=seed + 1)
    labeled_rows = ImageRows(labeled_ds, image_col, noisy, label_column=label_col, seed=seed)
    # an epoch passes over the longer stream, so the student's budget never follows the kept rows
    labeled_steps = math.ceil(len(labeled_rows) / batch_size)
    hard = not stats.get('soft', True)
    pseudo_batch = pseudo_batch_size(batch_size, unlabeled_ratio, len(pseudo_table), len(labeled_rows))
    main = PseudoRows(pseudo_table, un_rows, num_classes, hard=hard, min_length=labeled_steps * pseudo_batch)
    return TrainRows(main, pseudo_batch, labeled_rows, batch_size, hard, pseudo_rows=main.rows,
                     normalize=normalize)


def pseudo_batch_size(batch_size: int, unlabeled_ratio: int, pseudo_rows: int, labeled_rows: int) -> int:
    """Pseudo-labeled images per step: ``unlabeled_ratio`` x ``batch_size``, unless there are fewer
    pseudo-labeled rows than that many per labeled row. Then the pseudo share of a batch is their
    proportion, so that a pseudo-labeled row is not seen more often than a labeled one (3,000 pseudo
    rows beside 4,000 labeled ones at ratio 3 were each seen 120 times by a 30-epoch student)."""
    if pseudo_rows <= 0 or pseudo_rows >= labeled_rows * unlabeled_ratio:
        return batch_size * unlabeled_ratio
    return max(1, round(batch_size * pseudo_rows / labeled_rows))


def train_loaders(rows: TrainRows, num_workers: int, short_pass_in_process: bool = False):
    """The main loader and, for a student, the labeled one; each shuffles with its own generator."""
    main = make_loader(rows.main, rows.main_batch, True, num_workers, drop_last=len(rows.main) > rows.main_batch,
                       short_pass_in_process=short_pass_in_process)
    if rows.side_batch is None:
        return main, None
    side = make_loader(rows.labeled, rows.side_batch, True, num_workers,
                       drop_last=len(rows.labeled) > rows.side_batch, short_pass_in_process=short_pass_in_process)
    return main, side
