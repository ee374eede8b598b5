"""A chaos run: the whole loop killed at K points, rerun each time, must end bit-identical.

    python scripts/chaos.py                          # digits at the demo's defaults, K = 20, SIGKILL
    python scripts/chaos.py --signal term --k 6      # SIGTERM: each stop must leave a checkpoint
    python scripts/chaos.py --config my.yaml --k 5 --out chaos.json -- teacher.epochs=2

It runs `noisystudent run CONFIG` once uninterrupted (the reference), then again in a fresh
directory, stopping it at K points and rerunning the same command over the same directory after
each, until it completes. Then it compares the two: `final/model.safetensors` byte for byte, every
model stage's weights and `metrics.json` top-1, and every labels stage's selected rows (index,
label and soft label of each row of `data/`). It prints one row per kill (where it landed, the
signal, the exit code, what the rerun resumed from) and the comparison; exit code 0 only when all
match. Run it on a quiet machine (digits at the demo's defaults take a few times the demo's
minutes); `--work` keeps the runs and their logs.

Where the kills land: the reference run records every write its process makes under the run
directory (opens for writing, renames, mkdir, removals), through a Python audit hook
(`sys.addaudithook`, which only observes). The K kill points are drawn from that record with
`--seed`, spread over its kinds of work (labeling shards, checkpoint writes, `final/` and the
summary, stage exports, the selection of pseudo labels, the rest) and over each kind uniformly.
In a chaos run the same hook stops the process (SIGSTOP) at the first write at or past the next
kill point; the harness reads the run directory to say where it is, then sends the real signal to
the process from outside: SIGKILL to its whole process group, or SIGTERM to the process. So the
kills are deterministic for a seed, and land inside labeling, between shards, in the middle of a
checkpoint, of an export and of `final/`. A SIGTERM point is drawn only where the run promises a
checkpoint (training) or keeps its finished shards (labeling); elsewhere SIGTERM ends the process
like SIGKILL does.

tests/test_chaos.py runs the same at toy size (K = 5 with SIGKILL, K = 2 with SIGTERM).
"""
import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve()
HOOK_ENV = 'NOISYSTUDENT_CHAOS_HOOK'

# the kinds of work a kill point is drawn from, in the order kills are spread over them
KINDS = ('labeling', 'checkpoint', 'final', 'export', 'selection', 'other')
# where SIGTERM is handled: training stops at the next step with a checkpoint (every checkpoint write is
# inside the training loop), labeling at the next batch (a finished shard is renamed into raw/ inside it)
TERM_POINT = re.compile(r'^\S+ (iter\d+-\w+|finetune)/checkpoints/|^rename iter\d+-labels/raw/\.rows-')
LEFTOVER = re.compile(r'^\..+\.(tmp|old)([-.].*)?$')  # every writer's hidden temporary name
STOPPED_TRAINING = re.compile(r'(iter\d+-\w+|finetune): stopped by signal (\d+) at step (\d+); '
                              r'checkpoint saved in (.+)\. Run the same command again')
STOPPED_LABELING = re.compile(r'(iter\d+-labels): stopped by signal (\d+) while labeling')


# --- the child: the CLI under an audit hook ---------------------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _normalized(path: str) -> str:
    """A path as the same write of another process names it: temporary suffixes (pids, mkdtemp) dropped."""
    return re.sub(r'\.(tmp|old)-[^/]+', r'.\1-X', path)


def _install_hook(spec: Dict[str, Any]) -> None:
    """Record this process's writes under the run directory, or SIGSTOP it at the chosen one.

    ``spec``: ``run_dir``, ``log`` (a file the events go to, one JSON line each), and for a chaos
    attempt ``points`` (a JSON file: event key -> its index in the reference run) and ``target`` (stop at the
    first event whose reference index is at least this).
    """
    root = os.path.abspath(spec['run_dir']) + os.sep
    points = json.loads(Path(spec['points']).read_text()) if spec.get('points') else None
    target = spec.get('target')
    log = os.open(spec['log'], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    pid, state = os.getpid(), {'n': 0, 'done': False}

    def rel(path) -> Optional[str]:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, (str, os.PathLike)):
            return None
        path = os.path.abspath(os.fspath(path))
        return _normalized(path[len(root):]) if path.startswith(root) else None

    def key_of(event: str, args) -> Optional[str]:
        if event == 'open':
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            if not flags & _WRITE_FLAGS and not (isinstance(args[1], str) and set(args[1]) & set('wax+')):
                return None
            path = rel(args[0])
            return f'open {path}' if path else None
        if event in ('os.rename', 'os.link', 'os.symlink'):
            src, dst = rel(args[0]), rel(args[1])
            return f'{event[3:]} {src} -> {dst}' if src or dst else None
        path = rel(args[0])
        return f'{event.split(".")[-1]} {path}' if path else None

    def hook(event, args):
        if state['done'] or event not in ('open', 'os.rename', 'os.link', 'os.symlink', 'os.mkdir', 'os.remove',
                                          'os.rmdir', 'shutil.rmtree') or os.getpid() != pid:
            return  # a forked data worker is not the run
        try:
            key = key_of(event, args)
        except Exception:
            return
        if key is None:
            return
        state['n'] += 1
        if points is None:
            os.write(log, (json.dumps({'key': key}) + '\n').encode())
        elif points.get(key, -1) >= target:
            state['done'] = True
            os.write(log, (json.dumps({'key': key, 'index': points[key], 'writes': state['n']}) + '\n').encode())
            os.kill(pid, signal.SIGSTOP)  # the harness looks, then signals from outside

    sys.addaudithook(hook)


def _child(argv: List[str]) -> int:
    _install_hook(json.loads(os.environ.pop(HOOK_ENV)))
    from timm_noisystudent.cli import main
    return main(argv)


# --- the harness ---------------------------------------------------------------------------------

def kind_of(key: str) -> str:
    """Which kind of work a recorded write belongs to (see KINDS)."""
    path = key.split(' ', 1)[1]
    top = path.split('/', 1)[0]
    if top.startswith(('final', '.final', 'summary', '.summary', 'accuracy', '.accuracy')):
        return 'final'
    if '/checkpoints' in path:
        return 'checkpoint'
    if re.match(r'iter\d+-labels/raw/', path):
        return 'labeling'
    if re.match(r'iter\d+-labels/(data|\.data|stats|\.stats|confidence|\.confidence)', path):
        return 'selection'
    if re.search(r'/\.?model([./]|$)', path):
        return 'export'
    return 'other'


def stage_of(key: str) -> str:
    top = key.split(' ', 1)[1].split('/', 1)[0]
    match = re.match(r'^\.?(iter\d+-\w+|finetune|final|summary|accuracy)', top)
    name = match.group(1) if match else 'run'
    return {'summary': 'run', 'accuracy': 'run'}.get(name, name)


def reference_writes(reference: Path) -> List[str]:
    """Every write the reference run made under its directory, in order (see _install_hook)."""
    lines = (reference.parent / f'{reference.name}.events.jsonl').read_text().splitlines()
    return [json.loads(line)['key'] for line in lines]


def draw_points(events: Sequence[str], k: int, seed: int, term: bool = False) -> List[int]:
    """K reference indices to stop at: spread over the KINDS in turn, uniform within each, sorted.

    ``term``: only points where SIGTERM is handled (TERM_POINT).

    Only writes that the reference run makes once are points: a rerun makes them again only where
    it redoes the work, so "the first write at or past the point" is the same place in every attempt.
    """
    counts = Counter(events)
    by_kind: Dict[str, List[int]] = {}
    for i, key in enumerate(events):
        if counts[key] == 1 and (not term or TERM_POINT.match(key)):
            by_kind.setdefault(kind_of(key), []).append(i)
    order = [kind for kind in KINDS if by_kind.get(kind)]
    if not order:
        raise SystemExit('the reference run made no write to stop at')
    rng = random.Random(seed)
    pools = {kind: rng.sample(by_kind[kind], len(by_kind[kind])) for kind in order}
    chosen: List[int] = []
    while len(chosen) < k and any(pools.values()):
        for kind in order:
            if pools[kind] and len(chosen) < k:
                chosen.append(pools[kind].pop())
    return sorted(chosen)


def _latest_step(stage_dir: Path) -> Optional[int]:
    steps = [int(p.name.split('-')[1]) for p in (stage_dir / 'checkpoints').glob('step-*')
             if (p / 'trainer_state.json').is_file()]
    return max(steps, default=None)


def describe(run_dir: Path, key: str) -> str:
    """Where a stopped run is: the stage, what the run directory holds of it, and the write it was about to make."""
    stage = stage_of(key)
    stage_dir = run_dir / stage
    done = [p.name for p in sorted(run_dir.glob('iter*')) if (p / 'DONE').is_file()]
    state = ''
    if stage.endswith('-labels'):
        shards = len(list((stage_dir / 'raw').glob('*.parquet')))
        state = f', {shards} raw shard(s) written'
    elif (stage_dir / 'checkpoints').is_dir():
        step = _latest_step(stage_dir)
        state = f', last checkpoint step {step}' if step is not None else ', no checkpoint yet'
    return f'{stage} ({kind_of(key)}{state}; {len(done)} stage(s) done): {key}'


def _wait(proc: subprocess.Popen, deadline: float, stopped_ok: bool):
    """Wait for the child to stop (SIGSTOP) or end: ('stopped', None) or ('ended', exit code)."""
    flags = os.WNOHANG | (os.WUNTRACED if stopped_ok else 0)
    while True:
        pid, status = os.waitpid(proc.pid, flags)
        if pid:
            if os.WIFSTOPPED(status):
                return 'stopped', None
            proc.returncode = os.waitstatus_to_exitcode(status)
            return 'ended', proc.returncode
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
            raise TimeoutError(f'the run did not end within its time limit (a hang?); killed pid {proc.pid}')
        time.sleep(0.02)


def attempt(cmd: List[str], run_dir: Path, log_path: Path, env: Dict[str, str], hook: Dict[str, Any],
            sig: Optional[int], timeout: float) -> Dict[str, Any]:
    """One run of the command: stopped at the hook's point and sent ``sig``, or to its end."""
    events = Path(hook['log'])
    events.unlink(missing_ok=True)
    child_env = dict(env, **{HOOK_ENV: json.dumps(hook)})
    started = time.time()
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([sys.executable, str(HERE), '_child'] + cmd, stdout=log, stderr=subprocess.STDOUT,
                                env=child_env, start_new_session=True)
        deadline = started + timeout
        what, rc = _wait(proc, deadline, stopped_ok=sig is not None)
        result: Dict[str, Any] = {'log': str(log_path)}
        if what == 'stopped':
            hit = json.loads(events.read_text().splitlines()[-1])
            result.update(key=hit['key'], index=hit['index'], kind=kind_of(hit['key']), stage=stage_of(hit['key']),
                          where=describe(run_dir, hit['key']), signal=signal.Signals(sig).name)
            if sig == signal.SIGKILL:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group, as a lost node or the OOM killer
            else:
                os.kill(proc.pid, sig)  # to the run, as a preemption notice
                os.kill(proc.pid, signal.SIGCONT)
            _, rc = _wait(proc, deadline, stopped_ok=False)
    result.update(rc=rc, seconds=round(time.time() - started, 2))
    text = log_path.read_text(errors='replace')
    result['resumed'] = re.findall(r'resuming from (\S+)', text)
    result['errors'] = [line for line in text.splitlines() if line.startswith(('error:', 'Traceback'))][:3]
    lines = [line for line in text.strip().splitlines() if line.strip()]
    result['last_line'] = lines[-1] if lines else ''
    return result


def check_term(result: Dict[str, Any], run_dir: Path) -> Optional[str]:
    """What is wrong with a SIGTERM stop, or None: exit 143, the stop line, and the checkpoint it names."""
    if result['rc'] != 128 + signal.SIGTERM:
        return f"exit code {result['rc']}, not 143 (the run went on or died)"
    line = result['last_line']
    match = STOPPED_TRAINING.match(line)
    if match:
        ckpt = Path(match.group(4)) / f'step-{int(match.group(3)):08d}'
        if not (ckpt / 'trainer_state.json').is_file():
            return f'it printed a checkpoint that is not there: {ckpt}'
        if Path(match.group(4)).parent != run_dir / match.group(1):
            return f'the checkpoint is outside its stage: {line}'
        return None
    if STOPPED_LABELING.match(line):
        return None
    return f'its last line is not a stop line: {line!r}'


def _sha256(path: Path) -> Optional[str]:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _selected(labels_dir: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    files = sorted((labels_dir / 'data').glob('*.parquet'))
    if not files:
        return None
    tables = [pq.read_table(f).replace_schema_metadata(None) for f in files]
    return pa.concat_tables(tables).to_pydict()


def _top1(stage_dir: Path):
    try:
        return json.loads((stage_dir / 'metrics.json').read_text()).get('top1')
    except (OSError, ValueError):
        return None


def compare(reference: Path, run_dir: Path) -> List[Dict[str, Any]]:
    """The chaos run against the reference, one row per thing compared: what, the two values, same."""
    rows = []

    def row(what, ref, got, same=None):
        rows.append({'what': what, 'reference': ref, 'chaos': got, 'same': ref == got if same is None else same})

    ref_sha = _sha256(reference / 'final' / 'model.safetensors')
    got_sha = _sha256(run_dir / 'final' / 'model.safetensors')
    row('final/model.safetensors (sha256)', ref_sha and ref_sha[:16], got_sha and got_sha[:16],
        ref_sha is not None and ref_sha == got_sha)
    names = [p.name for p in reference.iterdir() if p.is_dir() and re.match(r'^(iter\d+-\w+|finetune)$', p.name)]
    stages = sorted(names, key=lambda n: (int(re.sub(r'\D', '', n.split('-')[0]) or 1 << 30), n.endswith('student')))
    for name in stages:
        if name.endswith('-labels'):
            ref, got = _selected(reference / name), _selected(run_dir / name)
            n_ref = len(ref['index']) if ref else None
            n_got = len(got['index']) if got else None
            row(f'{name}: selected rows (index, label, soft label)', n_ref, n_got, ref is not None and ref == got)
        else:
            row(f'{name}: metrics.json top-1', _top1(reference / name), _top1(run_dir / name))
            a, b = _sha256(reference / name / 'model' / 'model.safetensors'), _sha256(run_dir / name / 'model' /
                                                                                      'model.safetensors')
            row(f'{name}: model/model.safetensors (sha256)', a and a[:16], b and b[:16], a is not None and a == b)
    left = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob('*') if LEFTOVER.match(p.name))
    row('temporaries left behind', [], left[:5])
    return rows


def uninterrupted(cmd: Sequence[str], work: Path, env: Optional[Dict[str, str]] = None, timeout: float = 3600,
                  say=print) -> Path:
    """The reference: ``cmd`` run to its end in WORK/reference, every write it made in WORK/reference.events.jsonl."""
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    reference = work / 'reference'
    shutil.rmtree(reference, ignore_errors=True)
    say(f'reference: {" ".join(cmd)} --output {reference}')
    ref = attempt(list(cmd) + ['--output', str(reference)], reference, work / 'reference.log',
                  dict(os.environ if env is None else env),
                  {'run_dir': str(reference), 'log': str(work / 'reference.events.jsonl')}, None, timeout)
    if ref['rc'] != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {ref['rc']}); see {ref['log']}")
    say(f"reference: done in {ref['seconds']} s")
    return reference


def chaos(cmd: Sequence[str], work: Path, k: int, seed: int, sig: int = signal.SIGKILL,
          env: Optional[Dict[str, str]] = None, timeout: float = 3600, reference: Optional[Path] = None,
          points: Optional[Sequence[int]] = None, say=print) -> Dict[str, Any]:
    """Run ``cmd`` (a `noisystudent` argv without --output) killed K times and rerun; compare with the reference.

    ``reference``: a directory ``uninterrupted`` made (made here when None), to share between calls.
    ``points``: reference write indices to stop at instead of K drawn ones (to replay one kill).
    Returns the kills, the attempts, the comparison and ``ok``.
    """
    work = Path(work).resolve()
    env = dict(os.environ if env is None else env)
    reference = Path(reference).resolve() if reference is not None else uninterrupted(cmd, work, env, timeout, say)
    events = reference_writes(reference)
    if points is None:
        points = draw_points(events, k, seed, term=sig == signal.SIGTERM)
    points = sorted(points)
    counts = Counter(events)
    points_file = work / f'points-{signal.Signals(sig).name.lower()}.json'
    points_file.write_text(json.dumps({key: i for i, key in enumerate(events) if counts[key] == 1}))

    run_dir = work / f'chaos-{signal.Signals(sig).name.lower()}'
    shutil.rmtree(run_dir, ignore_errors=True)
    full = list(cmd) + ['--output', str(run_dir)]
    attempts: List[Dict[str, Any]] = []
    failure = None
    targets = list(points)
    while True:
        n = len(attempts) + 1
        target = targets.pop(0) if targets else None
        hook = {'run_dir': str(run_dir), 'log': str(work / f'{run_dir.name}.events.jsonl')}
        if target is not None:
            hook.update(points=str(points_file), target=target)
        result = attempt(full, run_dir, work / f'{run_dir.name}-{n:02d}.log', env, hook,
                         sig if target is not None else None, timeout)
        result['attempt'], result['point'] = n, target
        attempts.append(result)
        if 'key' in result:
            if sig == signal.SIGTERM:
                result['term_problem'] = check_term(result, run_dir)
            say(f"kill {n}: {result['signal']} at {result['where']} -> exit {result['rc']}")
            if result.get('term_problem'):
                failure = f"kill {n} (SIGTERM at {result['where']}): {result['term_problem']}"
                break
            continue
        if result['rc'] != 0:
            failure = f"attempt {n} failed with exit {result['rc']}: {result['errors'] or result['last_line']}"
            break
        if target is not None:
            result['missed'] = True  # the run ended before it reached the point
            say(f'attempt {n}: ended (exit 0) before its kill point; {len(targets)} point(s) left unused')
        break
    for a, nxt in zip(attempts, attempts[1:] + [None]):
        if 'key' in a:
            a['rerun_rc'] = nxt['rc'] if nxt else None
            a['rerun_resumed'] = nxt['resumed'] if nxt else []
    kills = [a for a in attempts if 'key' in a]
    comparison = compare(reference, run_dir) if failure is None else []
    ok = failure is None and len(kills) == len(points) and all(r['same'] for r in comparison)
    return {'signal': signal.Signals(sig).name, 'k': len(points), 'seed': seed, 'command': list(cmd),
            'reference': str(reference), 'run_dir': str(run_dir), 'points': points, 'reference_writes': len(events),
            'kills': kills, 'attempts': attempts, 'failure': failure, 'comparison': comparison, 'ok': ok}


def report(result: Dict[str, Any]) -> str:
    """The per-kill table and the comparison, as plain text."""
    lines = [f"{result['signal']}: {len(result['kills'])} of K={result['k']} kills landed (seed {result['seed']}, "
             f"{result['reference_writes']} writes in the reference run)", '']
    table = [['kill', 'stage', 'kind', 'signal', 'exit', 'rerun exit', 'rerun resumed from', 'where']]
    for i, a in enumerate(result['kills'], start=1):
        resumed = ', '.join(Path(p).name for p in a['rerun_resumed']) or '-'
        table.append([str(i), a['stage'], a['kind'], a['signal'], str(a['rc']), str(a['rerun_rc']), resumed,
                      a['where'].split(': ', 1)[1]])
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]) - 1)]
    for r in table:
        lines.append('  '.join(c.ljust(w) for c, w in zip(r, widths)) + '  ' + r[-1])
    lines.append('')
    if result['failure']:
        lines.append(f"FAILED: {result['failure']}")
    for r in result['comparison']:
        lines.append(f"{'same' if r['same'] else 'DIFFERENT':9}  {r['what']}: {r['reference']} / {r['chaos']}")
    lines.append('')
    lines.append('OK: the killed and resumed run ended identical to the uninterrupted one' if result['ok'] else
                 'NOT OK')
    return '\n'.join(lines)


def _dev_config(work: Path, overrides: Sequence[str]) -> List[str]:
    """The demo's data and config (digits, lcnet_050, every other key a default) as a run command."""
    import yaml
    from timm_noisystudent.config import config_to_dict
    from timm_noisystudent.demo import demo_config, write_demo_data
    write_demo_data(work / 'data')
    cfg = config_to_dict(demo_config(work / 'data', work / 'unused'))
    path = work / 'config.yaml'
    path.write_text(yaml.safe_dump(cfg))
    return ['run', str(path), *overrides, '--no-progress']


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['_child']:
        return _child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', help='a run config (default: the demo\'s digits task at its defaults)')
    parser.add_argument('--k', type=int, default=20, help='kills (default 20)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the kill points (default 0)')
    parser.add_argument('--signal', choices=['kill', 'term'], default='kill', help='SIGKILL (default) or SIGTERM')
    parser.add_argument('--work', help='keep the runs and logs here (default: a temporary directory, removed)')
    parser.add_argument('--timeout', type=float, default=4 * 3600, help='seconds one attempt may take')
    parser.add_argument('--out', help='also write the result as JSON here')
    parser.add_argument('overrides', nargs='*', metavar='KEY=VALUE', help='config overrides, after --')
    args = parser.parse_args(argv)
    import tempfile
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix='chaos-'))
    try:
        if args.config:
            cmd = ['run', str(Path(args.config).resolve()), *args.overrides, '--no-progress']
        else:
            cmd = _dev_config(work, args.overrides)
        sig = signal.SIGKILL if args.signal == 'kill' else signal.SIGTERM
        result = chaos(cmd, work, args.k, args.seed, sig, timeout=args.timeout)
        print(report(result))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
        return 0 if result['ok'] else 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
