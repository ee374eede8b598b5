"""Process plumbing: the Accelerator, precision, threads and workers, the allocator, signals.

Every stage (training, labeling, evaluation) runs in a process set up here, so the stages
share these helpers without importing each other.
"""
import copy
import ctypes
import os
import platform
import signal
import sys
import time
from datetime import timedelta
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import parse_flag_from_env

from .config import SMALL_IMAGE_MAX, UserError

__all__ = ['Preempted', 'StopFlag', 'resolve_precision', 'cpu_has_fast_bf16', 'cpu_threads', 'choose_workers',
           'num_workers_for', 'torch_threads', 'keep_freed_memory', 'process_state', 'make_accelerator', 'end_processes',
           'lost_peer_error', 'lost_processes', 'lost_processes_line']


class Preempted(Exception):
    """SIGTERM/SIGINT arrived; the work so far was saved at a safe point. ``signal`` is its number."""

    def __init__(self, message: str, signal: int = signal.SIGTERM):
        super().__init__(message)
        self.signal = int(signal)


def resolve_precision(requested: str, workload: str = 'train') -> str:
    """Accelerate's mixed_precision for a workload.

    'auto' is bf16 for inference where the hardware has it, and for training on GPUs;
    bf16 training on CPU was measured slower than fp32 for small images, so CPU trains in fp32.
    """
    if requested != 'auto':
        if requested == 'fp16' and not torch.cuda.is_available():
            raise UserError('fp16 needs a CUDA GPU; use --mixed-precision bf16 or no on CPU.')
        return requested
    if torch.cuda.is_available():
        return 'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
    if workload == 'inference' and cpu_has_fast_bf16():
        return 'bf16'
    return 'no'


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path('/proc/cpuinfo').read_text()
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def cpu_threads(num_workers: int, device: torch.device) -> Optional[int]:
    """torch's thread count for a CPU process whose cores its DataLoader workers share; None: leave it.

    Measured on 2 cores: two OpenMP threads next to a busy worker (or any other busy process)
    spin at every barrier and train many times slower; one thread per core left over does not.
    """
    if device.type != 'cpu' or num_workers <= 0:
        return None
    return max(1, _cpu_cores() - num_workers)


def _cpu_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get('LOCAL_WORLD_SIZE', '1'))))


def _model_costs(model: torch.nn.Module, input_size, batch: int, thread_counts, train: bool,
                 autocast: Optional[torch.dtype] = None) -> list:
    """Seconds per image of the model's forward (and backward when ``train``) at each thread count, on one copy."""
    probe = copy.deepcopy(model).train(train).to(memory_format=torch.channels_last)
    x = torch.randn(batch, *input_size).contiguous(memory_format=torch.channels_last)
    costs = []
    with torch.random.fork_rng():
        for threads in thread_counts:
            with torch_threads(threads):
                for _ in range(2):  # the first is warm-up
                    t0 = time.perf_counter()
                    if train:
                        probe(x).float().logsumexp(1).mean().backward()
                    else:
                        with torch.no_grad(), torch.autocast('cpu', dtype=autocast or torch.float32,
                                                             enabled=autocast is not None):
                            probe(x)
                    seconds = time.perf_counter() - t0
            costs.append(seconds / batch)
    return costs


def choose_workers(requested: Optional[int], rows, model: torch.nn.Module, input_size, device: torch.device,
                   train: bool = True, autocast: Optional[torch.dtype] = None, batch_size: int = 64) -> int:
    """DataLoader workers on CPU, from measured costs rather than from the image size.

    Times the decode and transform of a few rows, and the model's step on a small batch with all
    the process's cores and with one fewer, once at start-up. ``k`` workers cost a step
    max(data / k, model on the cores left); none costs data + model. The cheapest wins. On an
    accelerator, or when ``requested``, as ``num_workers_for``.
    """
    size = int(input_size[-1])
    if requested is not None or device.type != 'cpu' or len(rows) == 0:
        return num_workers_for(requested, size, device)
    cores = _cpu_cores()
    if cores < 2:
        return 0
    rows.__getitems__(list(range(min(8, len(rows)))))  # warm-up: file handles, lazy imports
    n = min(32, len(rows))
    t0 = time.perf_counter()
    rows.__getitems__(list(range(n)))
    data = (time.perf_counter() - t0) / n
    batch = max(1, min(batch_size, 64 if size <= 128 else 8))
    model_all, model_less = _model_costs(model, input_size, batch, (cores, cores - 1), train, autocast)
    in_process = data + model_all
    costs = {}
    for k in range(1, min(8, cores - 1) + 1):
        left = model_less if k == 1 else model_all * cores / (cores - k)
        costs[k] = max(data / k, left)
    best = min(costs, key=costs.get)
    # a worker must win clearly: handing batches over and sharing the cores cost more than the estimate
    # (B0 at 32 px: estimated 9% faster with a worker, measured 15% slower)
    return best if costs[best] < WORKER_MARGIN * in_process else 0


WORKER_MARGIN = 0.8


@contextmanager
def torch_threads(n: Optional[int]):
    """torch.set_num_threads(n) for a block, then the count from before; None leaves it alone."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h


_allocator_kept: Optional[bool] = None


def keep_freed_memory() -> bool:
    """On glibc, keep freed memory for reuse instead of handing it back to the kernel after every step.

    torch's CPU tensors come from malloc. With glibc's defaults a large activation is a fresh
    ``mmap`` that ``free`` unmaps, and the top of the heap is trimmed as soon as 128 KiB are free,
    so every step faults the same memory in again page by page, zeroed by the kernel. Measured
    on 2 cores (tf_efficientnet_b0 at 224 px, batch 32, fp32): about a million page faults per
    training step; with mmap off and trimming above 2 GiB only, forward+backward 7.5 -> 9.8 img/s
    and inference 31.7 -> 39.3 img/s. Memory that is freed stays with the process, so its RSS is
    its peak, which a training or labeling loop reaches again at every step anyway.

    Done once per process, on Linux with glibc, and not when the user chose the allocator
    (``LD_PRELOAD``, ``GLIBC_TUNABLES`` or any ``MALLOC_*`` variable). Returns whether it is on.
    """
    global _allocator_kept
    if _allocator_kept is not None:
        return _allocator_kept
    _allocator_kept = False
    chosen = any(k in ('LD_PRELOAD', 'GLIBC_TUNABLES') or k.startswith('MALLOC_') for k in os.environ)
    if chosen or not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc':
        return False
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    except (OSError, AttributeError):
        return False
    _allocator_kept = ok
    return ok


def progress_bar(**kwargs):
    """A tqdm bar by the project's rules: in a terminal it redraws, in a log (no TTY) it writes one
    line a minute at most. ``delay=1`` keeps a step that is over at once from leaving a frame."""
    from tqdm.auto import tqdm

    kwargs.setdefault('mininterval', 0.1 if sys.stderr.isatty() else 60.0)
    return tqdm(dynamic_ncols=True, leave=False, **kwargs)


def process_state() -> PartialState:
    """Accelerate's process state, initialised as ``Accelerator`` would be.

    A bare ``PartialState()`` ignores ``ACCELERATE_USE_CPU``; created first, it would pin a
    multi-process CPU launch to one process for the rest of the run.
    """
    return PartialState(cpu=parse_flag_from_env('ACCELERATE_USE_CPU'))


def make_accelerator(mixed_precision: str = 'no', seed: int = 0, **kwargs) -> Accelerator:
    """An Accelerator with these settings, even if an earlier stage in this process chose others.

    Accelerate keeps one process-wide state and refuses a second precision; stages of one run
    legitimately differ (fp32 training, bf16 labeling), so the precision state is reset while
    the distributed process group is kept.
    """
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    state = process_state()
    # Checked here, not read from Accelerate's exception: its wording differs between releases.
    if parse_flag_from_env('ACCELERATE_USE_FSDP') and state.device.type == 'cpu':
        raise UserError('FSDP shards a model over accelerators (CUDA, XPU, NPU, ...) and this run has none '
                        '(the machine has no accelerator, or ACCELERATE_USE_CPU is set); on CPU launch without '
                        '--use_fsdp, e.g. ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...')
    config = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed)
    accelerator = Accelerator(mixed_precision=mixed_precision, dataloader_config=config, **kwargs)
    if accelerator.device.type == 'cpu':
        keep_freed_memory()
    return accelerator


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and stops."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and lost_peer_error(exc):
            # a launcher that saw a process die sends the others SIGTERM: it must not end this one
            # before it has said which process is gone (cli.main), so the flag stays in place
            return
        for sig, old in self._old.items():
            signal.signal(sig, old)



def num_workers_for(requested: Optional[int], image_size: int, device: torch.device) -> int:
    """DataLoader workers: ``requested``, or when None about the share of the cores decoding needs.

    An accelerator leaves the CPU to feed it: half the cores, at most 8. On CPU the model needs
    the same cores (and gets the rest, see ``engine.cpu_threads``). Measured on 2 cores: B0 at
    224 px spends about 5% of a step on data and runs fastest with no worker (one cost 7%, or 40%
    with one torch thread); 32 px digits spend about half and train 1.4x faster with one worker
    and one thread.
    """
    if requested is not None:
        return requested
    cores = os.cpu_count() or 1
    share = 0.5 if device.type != 'cpu' or image_size <= SMALL_IMAGE_MAX else 0.125
    return min(8, int(cores * share))


def end_processes() -> None:
    """Tear down the process group of an ``accelerate launch`` run once a command has finished.

    Left to the interpreter's exit, gloo's threads can outlive it: one rank then aborts
    ("terminate called without an active exception") after the work is done, and the launch fails.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# how long a process that stops waits for the others to stop too, before it names those that did not:
# well below the 30 s a torchrun agent gives the processes it stops before it kills them
PEER_WAIT_S = 10.0


def _launch_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def lost_peer_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective of a multi-process run that failed: a process it waited on is gone."""
    if _launch_size() < 2:
        return False
    if isinstance(exc, torch.distributed.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(m in text for m in ('gloo', 'Gloo', 'NCCL', 'Connection reset'))


def lost_processes(wait_s: float = PEER_WAIT_S) -> Optional[List[int]]:
    """The ranks of this launch that did not stop with this process; [] when all did, None when it cannot tell.

    Every process that stops (on a signal, or when a collective failed) checks in to the launch's
    key-value store, the one its process group was made with, and waits up to ``wait_s`` for the
    others. A process that was killed never checks in. None: a single process, or the store lived
    in a process that is gone.
    """
    if _launch_size() < 2:
        return None
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    prefix = f'noisystudent/stopping/{os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")}/'
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=wait_s))
        store.set(f'{prefix}{rank}', str(os.getpid()))
        missing = [r for r in range(world) if r != rank]
        deadline = time.monotonic() + wait_s
        while missing:
            missing = [r for r in missing if not store.check([f'{prefix}{r}'])]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except Exception:  # the store's server was in a process that is gone
        return None
    return missing


def lost_processes_line(lost: Optional[List[int]]) -> Optional[str]:
    """The one line for processes of this launch that are gone, and whether this process says it:
    the lowest rank still here does. None: this process stays silent."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if lost is None:  # the store went with the process that served it: rank 0's, unless a launcher served it
        if rank != min(r for r in range(world) if r != 0):
            return None
        who = 'another process of this launch'
    else:
        if rank != min(r for r in range(world) if r not in lost):
            return None
        who = ('processes ' + ', '.join(map(str, lost)) if len(lost) > 1 else f'process {lost[0]}') + f' of {world}'
    return (f'error: {who} is gone or did not stop with the others (killed, out of memory, or not signalled), '
            'so this launch stopped; run the same command again to resume: checkpoints, finished stages and '
            'labeled shards are kept.')
