"""File plumbing: atomic writes, directory swaps, JSON lines, the output lock, full-disk errors and warnings.

Every writer here leaves the old file or the new one, never half of one, and its temporary
names start with a dot, so globs for finished files never match them.
"""
import contextlib
import errno
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from .config import UserError, config_to_yaml

__all__ = ['atomic_path', 'fsync_file', 'replace_dir', 'remove_tree', 'write_text_atomic', 'write_json_atomic',
           'append_jsonl', 'keep_jsonl_until', 'save_figure', 'text_table', 'save_config', 'output_lock', 'LOCK_NAME',
           'writing', 'DiskFull', 'full_disk_errno', 'shown_path', 'mebibytes', 'warn_if_short_of_space']


class DiskFull(UserError):
    """A write that found the disk full or the quota spent: one line naming the path and what to free."""

    def __init__(self, path: Union[str, os.PathLike], code: int, need: Optional[int] = None,
                 rerun: str = 'rerun the same command'):
        self.path, self.code, self.need = Path(path), code, need
        where = _filesystem_of(self.path)
        free = _free_bytes(where) if code == errno.ENOSPC else None  # a quota is not the disk's free space
        sizes = ', '.join(([f'about {mebibytes(need)} needed'] if need else []) +
                          ([f'{mebibytes(free)} free now'] if free is not None else []))
        sizes = f' ({sizes})' if sizes else ''
        if code == errno.EDQUOT:
            what = (f'disk quota exceeded writing {shown_path(self.path)}: free some of your files on {where} '
                    f'or raise your quota{sizes}')
        else:
            what = f'no space left on device writing {shown_path(self.path)}: free some space on {where}{sizes}'
        super().__init__(f'{what}, and {rerun}; finished work is kept.')


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def full_disk_errno(e: BaseException) -> Optional[int]:
    """ENOSPC or EDQUOT when ``e`` is a full disk or a spent quota, however the writer reports it, else None.

    Python and pyarrow raise an ``OSError`` with the errno; safetensors a ``SafetensorError`` whose
    text ends in ``(os error 28)``.
    """
    if isinstance(e, OSError):
        return e.errno if e.errno in _NO_SPACE else None
    found = re.search(r'\(os error (\d+)\)', str(e)) if type(e).__name__ == 'SafetensorError' else None
    return int(found.group(1)) if found and int(found.group(1)) in _NO_SPACE else None


@contextlib.contextmanager
def writing(path: Union[str, os.PathLike], need: Optional[int] = None) -> Iterator[None]:
    """A full disk or quota while the block writes ``path`` becomes one ``DiskFull`` line that names it.

    ``need`` is the bytes the write takes, where known. A ``DiskFull`` from a writer inside the
    block passes through: it names the file that could not be written.
    """
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        code = full_disk_errno(e)
        if code is None:
            raise
        raise DiskFull(path, code, need) from e


_HIDDEN = re.compile(r'(^|/)\.([^/]+?)\.(?:tmp|old)(?:-[^/]*)?(?=/|$)')


def shown_path(path: Union[str, os.PathLike]) -> str:
    """A path as the user knows it: a writer's hidden temporary (``.NAME.tmp-XXXX``) is named ``NAME``."""
    return _HIDDEN.sub(r'\1\2', os.fspath(path))


def mebibytes(n: float) -> str:
    """A size for a message: whole MiB from 10 MiB up, tenths below, KiB under one MiB."""
    if n >= 10 * 2 ** 20:
        return f'{n / 2 ** 20:,.0f} MiB'
    if n >= 2 ** 20:
        return f'{n / 2 ** 20:.1f} MiB'
    return f'{max(1, math.ceil(n / 1024))} KiB'


def _filesystem_of(path: Path) -> Path:
    """The mount point that holds ``path``: where space has to be freed."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _free_bytes(path: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def warn_if_short_of_space(path: Union[str, os.PathLike], need: int, what: str) -> bool:
    """Warn, in one line, when the filesystem of ``path`` has less free than ``need`` bytes; True if it did.

    ``what`` says what the estimate counts. Nothing stops: the estimate is rough, and space may be
    freed while the stage runs.
    """
    where = _filesystem_of(Path(path))
    free = _free_bytes(where)
    if free is None or free >= need:
        return False
    warnings.warn(f'{mebibytes(free)} free on {where}, and {shown_path(path)} may need about {mebibytes(need)} '
                  f'({what}); free some space now, or the stage may stop with a full disk.', stacklevel=3)
    return True


def save_config(cfg: Any, path: Union[str, os.PathLike]) -> Path:
    """Write ``cfg`` as YAML to ``path`` atomically: a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, config_to_yaml(cfg))
    return path


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike], need: Optional[int] = None) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; on success it is synced and renamed to ``path``.

    A crash or a full disk leaves the old file or the new one, never half of one: what the
    block wrote is removed when it raises, and a full disk is a ``DiskFull`` that names ``path``
    (``need``: the bytes it takes, where known). The temporary name starts with a dot and carries no
    extension of its own, so globs for finished files (``*.parquet``) never match it.
    """
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    try:
        with writing(path, need):
            yield tmp
            fsync_file(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_file(path: Union[str, os.PathLike]) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


def replace_dir(tmp: Union[str, os.PathLike], out: Union[str, os.PathLike]) -> None:
    """Move a finished directory ``tmp`` to ``out``, replacing an older one whole.

    If the move fails (a full disk can refuse a new directory entry), the older ``out`` is put back.
    Its files get the mode a new file gets (0666 & ~umask), as config.json beside them has:
    safetensors writes 0600, which would let another user read a model's config but not its weights.
    """
    tmp, out = Path(tmp), Path(out)
    mask = os.umask(0o022)
    os.umask(mask)
    for f in tmp.iterdir():
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~mask)
    old = out.parent / f'.{out.name}.old-{os.getpid()}'
    shutil.rmtree(old, ignore_errors=True)
    with writing(out):
        moved = out.exists()
        if moved:
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if moved:
                old.rename(out)
            raise
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Union[str, os.PathLike], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding='utf-8')


def write_json_atomic(path: Union[str, os.PathLike], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


LOCK_NAME = '.noisystudent.lock'


@contextlib.contextmanager
def output_lock(directory: Union[str, os.PathLike], state: Any = None) -> Iterator[None]:
    """Hold an exclusive lock on an output directory while the block runs.

    The lock is the operating system's (``filelock``, an ``flock`` on Unix), so it dies with its
    process: a killed run leaves nothing that blocks the next one. The holder writes its pid beside
    it, so a second process can say who holds it. Under ``accelerate launch`` (``state`` a
    ``PartialState`` of several processes) the main process holds it, and the others stop with
    the same error when it cannot.
    """
    import filelock

    directory = Path(directory)
    main = state is None or state.is_main_process
    lock, problem = None, None
    created = not directory.exists()
    if main:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(str(directory / LOCK_NAME), timeout=0)
            lock.acquire()
        except filelock.Timeout:
            lock = None
            try:
                holder = f' (pid {int((directory / (LOCK_NAME + ".pid")).read_text().split()[0])})'
            except (OSError, ValueError, IndexError):
                holder = ''
            problem = (f'{directory} is in use by another noisystudent process{holder}; wait for it to end, '
                       'or give this one another output directory.')
        else:
            try:
                (directory / (LOCK_NAME + '.pid')).write_text(f'{os.getpid()}\n')
            except OSError:  # only for the message above; a full disk is said by the write that needs the space
                pass
    if state is not None and getattr(state, 'num_processes', 1) > 1:
        from accelerate.utils import broadcast_object_list
        problem = broadcast_object_list([problem])[0]
    if problem:
        raise UserError(problem)
    try:
        yield
    except BaseException:
        if lock is not None and created:  # a command that failed before writing anything leaves nothing
            (directory / (LOCK_NAME + '.pid')).unlink(missing_ok=True)
            if [p.name for p in directory.iterdir()] == [LOCK_NAME]:
                (directory / LOCK_NAME).unlink(missing_ok=True)
                directory.rmdir()
        raise
    finally:
        if lock is not None:
            lock.release()




def remove_tree(path: Union[str, os.PathLike]) -> None:
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)


def append_jsonl(path: Union[str, os.PathLike], obj: Any) -> None:
    """One JSON line appended and synced: a kill loses at most the line being written."""
    with writing(path), open(path, 'a') as f:
        f.write(json.dumps(obj) + '\n')
        f.flush()
        os.fsync(f.fileno())


def keep_jsonl_until(path: Union[str, os.PathLike], step: int) -> None:
    """A metrics.jsonl without the lines past ``step`` (a resumed run writes them again), written atomically."""
    path = Path(path)
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a kill
            continue
    write_text_atomic(path, ''.join(json.dumps(r) + '\n' for r in rows if r.get('step', 0) <= step))


def save_figure(fig, path: Union[str, os.PathLike], dpi: int = 100) -> None:
    """A matplotlib figure laid out, written atomically as PNG, and closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format='png')
    plt.close(fig)


def text_table(rows, left: int = 1, rule: bool = True) -> str:
    """Rows of cells as aligned plain text: the first ``left`` columns to the left, the rest to the right,
    a rule under the first row when ``rule``; a row of empty cells stays an empty line."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in rows if len(row) > i) for i in range(max(len(r) for r in rows))]
    lines = ['  '.join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             if any(row) else '' for row in rows]
    if rule:
        lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)
