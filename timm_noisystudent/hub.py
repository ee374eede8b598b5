"""Export and push to the Hugging Face Hub (the cards come from ``cards``).

An exported model directory is ``model.safetensors`` + ``config.json`` (timm's ``save_for_hf``
format, naming the canonical timm architecture) + ``README.md``, the model card. Plain timm
loads it without this plugin, from ``local-dir:`` or, once pushed, from ``hf-hub:``.

Pushing uses ``huggingface_hub.HfApi`` and nothing else: ``create_repo(exist_ok=True)``, then the
whole folder as one ``create_commit``, which the Hub applies all or nothing. The token is
huggingface_hub's (``HF_TOKEN`` or a login); it is handed to the client and never printed or written.

When the network fails: huggingface_hub retries, with its own backoff, the requests that move
file content (preupload, the LFS batch, each LFS upload and its verify). It does not retry the
commit, the repo or branch creation or the card check; a push retries those itself, on the
answers and errors huggingface_hub counts as transient (408, 429, 5xx, timeouts, broken
connections), ``PUSH_TRIES`` times in all, waiting ``PUSH_WAIT`` seconds and then twice as long
each time, or what ``Retry-After`` asks up to ``PUSH_MAX_WAIT``. A commit whose answer was lost
is retried too: the files it sent are then on the Hub, so the retry changes nothing and makes no
second commit. A pull request is the exception (a retry would open a second one), so a lost
answer there ends the push. When the tries run out, one line says what failed, that nothing was
committed (or that a commit may have been made, and where to look), and the command to rerun.
"""
import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Tuple, Union

from huggingface_hub import HfApi

from .config import UserError
from .files import DiskFull, fsync_file, full_disk_errno, replace_dir
from .cards import (
    bare_card, labels_card, model_card, portable_config, read_model_config,
)
from .rundir import ModelSource, labels_files, resolve_source
from .models import check_safetensors, check_weights_fit, hub_endpoint, pickled_weights, read_state_dict

__all__ = ['export', 'push', 'push_labels', 'portable_stats', 'check_repo_id', 'check_revision']


# --- where a model comes from -------------------------------------------------------------------


# --- reading what a run left -------------------------------------------------------------------


# --- the model card ----------------------------------------------------------------------------


# --- export ------------------------------------------------------------------------------------

def _put(src: Path, dst: Path, link: bool) -> None:
    if link:
        with contextlib.suppress(OSError):
            os.link(src, dst)
            return
    shutil.copyfile(src, dst)


EXPORT_FILES = ('model.safetensors', 'config.json', 'README.md')


def _check_out(out: Path) -> None:
    """An export replaces ``out`` whole: only a new or empty directory, or an earlier export, may be replaced."""
    if out.exists() and not out.is_dir():
        raise UserError(f'{out} is a file; pass a directory for the export.')
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not names:
        return
    foreign = [n for n in names if n not in EXPORT_FILES]
    if foreign or 'config.json' not in names or 'README.md' not in names:
        what = f"it also holds {', '.join(foreign[:3])}" + (' ...' if len(foreign) > 3 else '') if foreign \
            else 'it lacks the config.json and README.md an export writes'
        raise UserError(f'{out} exists and is not an earlier export ({what}); an export replaces its directory '
                        'whole, so pick a new directory.')


def export(
        src: Union[str, os.PathLike, ModelSource],
        out: Union[str, os.PathLike],
        repo_id: Optional[str] = None,
        license: Optional[str] = None,
        _link: bool = False,
        allow_pickle: bool = False,
) -> Path:
    """Write ``out/`` with ``model.safetensors``, ``config.json`` and ``README.md``; return it.

    The weights and config are the ones ``models.save_model`` (timm's ``save_for_hf``) wrote,
    copied byte for byte, with the architecture made canonical if needed. The card is rendered
    from the run around ``src``; a bare directory that already has a README.md keeps it (and
    its edits), with the placeholder repo id filled in. The directory appears whole or not at
    all, and replaces an earlier export at ``out``. With ``allow_pickle``, a directory that holds only
    pickled weights is converted: its tensors (``torch.load(weights_only=True)``) become model.safetensors.
    """
    source = resolve_source(src, allow_pickle)
    out = Path(out).expanduser()
    _check_out(out)
    weights = source.model_dir / 'model.safetensors'
    state = None
    if weights.is_file():
        check_safetensors(weights)
    else:
        state = read_state_dict(pickled_weights(source.model_dir), allow_pickle=True)
    config = read_model_config(source.model_dir)
    portable = portable_config(config)
    check_weights_fit(source.model_dir)  # plain timm must load what is exported
    card = bare_card(source, repo_id) if _is_bare(source) else None
    if card is None:
        card = str(model_card(source, repo_id=repo_id, license=license))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f'.{out.name}.tmp-'))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; an export is shared like any copied directory
    try:
        if state is None:
            _put(weights, tmp / 'model.safetensors', _link)
        else:
            from safetensors.torch import save_file
            # safetensors refuses tensors that share memory (tied weights): store each on its own
            tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
            save_file(tensors, str(tmp / 'model.safetensors'))
        if portable is config:
            shutil.copyfile(source.model_dir / 'config.json', tmp / 'config.json')
        else:
            (tmp / 'config.json').write_text(json.dumps(portable, indent=2), encoding='utf-8')
        (tmp / 'README.md').write_text(card, encoding='utf-8')
        if not _link:
            for name in ('model.safetensors', 'config.json', 'README.md'):
                fsync_file(tmp / name)
        replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        code = full_disk_errno(e)
        if code is not None:  # named as the export, not as the file it copied from
            need = (weights.stat().st_size if state is None else
                    sum(v.numel() * v.element_size() for v in state.values())) + len(card.encode())
            raise DiskFull(out, code, need) from e
        raise
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_bare(source: ModelSource) -> bool:
    return source.stage_dir is None and source.run_dir is None


# --- push --------------------------------------------------------------------------------------

_REF = re.compile(r'^refs/pr/\d+$')
_BAD_REF = re.compile(r'[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|^/|/$|\.$|\.lock$|^-|^@$|(^|/)\.')


def check_repo_id(repo_id: Optional[str]) -> str:
    """``repo_id`` if it is a valid Hub id; a UserError that says what one looks like otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id:
        raise UserError('--repo-id is required: ORG/NAME, for example my-org/my-model.')
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"invalid repo id '{repo_id}': use ORG/NAME with letters, digits, '-', '_' or '.' "
                        "(no '--' or '..', at most 96 characters).") from None
    return repo_id


def check_revision(revision: Optional[str]) -> Optional[str]:
    """A branch name (or refs/pr/N) to push to; a UserError for anything git would refuse."""
    if revision is None or _REF.match(revision):
        return revision
    if re.fullmatch(r'[0-9a-f]{40}', revision):
        raise UserError(f'--revision {revision} is a commit id; push to a branch name instead.')
    if not revision or _BAD_REF.search(revision) or len(revision) > 255:
        raise UserError(f"invalid --revision '{revision}': use a branch name such as dev or v1.0 "
                        "(no spaces, '..', '~', '^', ':', '?', '*', '[' or '\\').")
    return revision.removeprefix('refs/heads/')


def _token(token: Optional[str]) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise UserError('no Hugging Face token: set HF_TOKEN or run `hf auth login` with a token that can write, '
                        'then push again.')
    return token


def _hub_url() -> str:
    return hub_endpoint()


def _transport_errors() -> Tuple[type, ...]:
    # huggingface_hub's HTTP client (httpx, or its httpx2 fork in newer releases) raises these
    # when the Hub cannot be reached at all
    import importlib

    for name in ('httpx2', 'httpx'):
        with contextlib.suppress(ImportError):
            return (importlib.import_module(name).TransportError,)
    return ()


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: Optional[str], repo_type: str = 'model') -> Iterator[None]:
    """Turn the client's errors into one-line UserErrors that say what to do (never with the token)."""
    from huggingface_hub.errors import (
        HFValidationError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError,
    )

    kind = '' if repo_type == 'model' else f'{repo_type} '
    try:
        yield
    except RevisionNotFoundError:
        raise UserError(f"revision '{revision}' does not exist in {kind}repo {repo_id} (404); "
                        'push to a branch name or an open refs/pr/N.') from None
    except RepositoryNotFoundError as e:
        status = e.response.status_code if e.response is not None else 404
        raise UserError(f'{kind}repo {repo_id} not found ({status}); check the id, and that your token can see '
                        'and write it.') from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise UserError('the Hub rejected the token (401 Unauthorized); set a valid HF_TOKEN or run '
                            '`hf auth login`.') from None
        if status == 403:
            raise UserError(f'no write access to {kind}repo {repo_id} (403 Forbidden); use a token with write '
                            'access, or a namespace you own.') from None
        if status == 404:
            raise UserError(f'not found on the Hub (404) while pushing to {kind}repo {repo_id}; check the id '
                            'and --revision.') from None
        message = (getattr(e, 'server_message', None) or '').splitlines()
        raise UserError(f'the Hub answered {status} for {kind}repo {repo_id}'
                        f"{': ' + message[0] if message else ''}; try again later.") from None
    except HFValidationError as e:
        raise UserError(f'invalid Hub argument: {str(e).splitlines()[0]}') from None
    except OfflineModeIsEnabled:
        raise UserError('HF_HUB_OFFLINE is set, so nothing can be pushed; unset it and push again.') from None
    except _transport_errors() as e:
        raise UserError(f'cannot reach the Hub at {_hub_url()} ({type(e).__name__}); check your network '
                        'or HF_ENDPOINT.') from None
    except ValueError as e:
        if 'Invalid metadata' in str(e):
            raise UserError(f"the Hub rejected README.md's metadata: {str(e).splitlines()[0]}; fix its "
                            'YAML header.') from None
        raise


# --- retries --------------------------------------------------------------------------------------

PUSH_TRIES = 3  # attempts in all, for each step a push retries itself
PUSH_WAIT = 2.0  # seconds before the first retry; each later wait is twice as long
PUSH_MAX_WAIT = 30.0  # the longest wait; a longer Retry-After ends the push instead
# what huggingface_hub's http_backoff counts as transient (its _DEFAULT_RETRY_ON_STATUS_CODES)
_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


class _Fault(NamedTuple):
    what: str  # what went wrong, and in which step, for messages
    unreachable: bool  # no connection could be made at all
    answered: bool  # the Hub answered (with an error status): it did nothing
    commit: bool  # the failed request was the commit
    client_retried: bool  # huggingface_hub already retried that request with its backoff
    retry_after: Optional[float]


def _transient_errors() -> Tuple[type, ...]:
    import importlib

    for name in ('httpx2', 'httpx'):
        with contextlib.suppress(ImportError):
            module = importlib.import_module(name)
            return module.TimeoutException, module.NetworkError, module.RemoteProtocolError
    return ()


def _step(method: str, path: str) -> Tuple[str, bool]:
    """What a request was for, and whether huggingface_hub retries it itself."""
    if method == 'PUT' or '/info/lfs/objects/' in path:
        return 'the upload of a file', True
    if '/preupload/' in path:
        return 'the preupload check', True
    if '/commit/' in path:
        return 'the commit', False
    if path.endswith('/repos/create'):
        return 'the creation of the repo', False
    if '/branch/' in path:
        return 'the creation of the branch', False
    if path.endswith('/validate-yaml'):
        return "the check of the card's metadata", False
    return 'a request', False


def _fault(e: BaseException) -> Optional[_Fault]:
    """The transient fault behind ``e``, or None when retrying cannot help."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import parse_ratelimit_headers

    response, retry_after, unreachable = None, None, False
    if isinstance(e, HfHubHTTPError):
        response = e.response
        if response is None or response.status_code not in _TRANSIENT_STATUS:
            return None
        request = response.request
        what = f'the Hub answered {response.status_code} to {{}}'
        limit = parse_ratelimit_headers(response.headers) if response.status_code == 429 else None
        if limit is not None and limit.remaining == 0:
            retry_after = float(limit.reset_in_seconds)
        elif (response.headers.get('retry-after') or '').strip().isdigit():
            retry_after = float(response.headers['retry-after'].strip())
    elif isinstance(e, _transient_errors()):
        try:
            request = e.request
        except RuntimeError:
            return None
        unreachable = type(e).__name__ == 'ConnectError'
        what = (f'cannot reach the Hub at {_hub_url()} ({type(e).__name__}) for {{}}' if unreachable
                else f'the connection to the Hub broke during {{}} ({type(e).__name__})')
    else:
        return None
    step, client_retried = _step(request.method, request.url.path)
    return _Fault(what.format(step), unreachable, response is not None, step == 'the commit', client_retried,
                  retry_after)


def _retrying(call: Callable[[], Any], gave_up: Callable[[_Fault, int], str], may_repeat_commit: bool = True):
    """``call()``, tried again after a transient fault that huggingface_hub did not retry itself.

    ``gave_up(fault, tries)`` is the one-line message when the tries run out. A commit whose answer
    was lost is repeated only when ``may_repeat_commit``: repeating it is harmless on a branch.
    """
    for attempt in range(1, PUSH_TRIES + 1):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - _fault() picks the transient ones; the rest go on as they are
            fault = _fault(e)
            if fault is None:
                raise
            lost_commit = fault.commit and not fault.answered
            if (attempt == PUSH_TRIES or fault.client_retried or (lost_commit and not may_repeat_commit)
                    or (fault.retry_after or 0) > PUSH_MAX_WAIT):
                raise UserError(gave_up(fault, attempt)) from None
            wait = fault.retry_after if fault.retry_after is not None else PUSH_WAIT * 2 ** (attempt - 1)
            wait = min(wait, PUSH_MAX_WAIT)
            warnings.warn(f'{fault.what}; trying again in {wait:g} s '
                          f'(try {attempt + 1} of {PUSH_TRIES}).', stacklevel=2)
            time.sleep(wait)


def _gave_up_line(fault: _Fault, tries: int, repo: str, repo_url: str, branch: str, create_pr: bool,
                  command: str) -> str:
    """What failed, what reached the Hub, and what to run again."""
    if (fault.retry_after or 0) > PUSH_MAX_WAIT:
        how, when = f'{fault.what}, asking to wait {fault.retry_after:g} s', f'after {fault.retry_after:g} s'
    elif fault.client_retried:
        how, when = f"{fault.what}, even after huggingface_hub's own retries", 'later'
    else:
        how, when = f"{fault.what}{f', {tries} tries in all' if tries > 1 else ''}", 'later'
    rerun = f'rerun `{command}` {when}'
    if fault.unreachable:
        rerun = f'check your network or HF_ENDPOINT, then rerun `{command}`'
    if fault.commit and not fault.answered:
        if create_pr:
            return (f'{how}, so a pull request may have been opened on {repo}: look at {repo_url}/discussions, '
                    f'and {rerun} only if none was.')
        return (f'{how}, so the commit may have been made: look at {repo_url}/commits/{branch}; {rerun} either '
                'way (files the Hub already holds make no new commit).')
    return (f'{how}; nothing was committed to {repo}; {rerun} (files already uploaded are not sent again).')


def _api(token: Optional[str]) -> HfApi:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own_version = version('timm-noisystudent')
    except PackageNotFoundError:
        own_version = None
    return HfApi(token=_token(token), library_name='timm-noisystudent', library_version=own_version)


def _prepare_repo(api: HfApi, repo_id: str, repo_type: str, private: bool, revision: Optional[str]) -> str:
    """Create the repo (and a missing branch); return the repo id the Hub resolved."""
    if private:
        from huggingface_hub.errors import RepositoryNotFoundError
        try:
            info = api.repo_info(repo_id, repo_type=repo_type)
        except RepositoryNotFoundError:
            info = None
        if info is not None and not info.private:
            raise UserError(f'{repo_id} exists and is public, and --private applies only to a new repo, so this push '
                            'would be public; make the repo private on the Hub first, or push without --private.')
    repo_id = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True).repo_id
    if revision is not None and not _REF.match(revision) and revision != 'main':
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    return repo_id


def push(
        src: Union[str, os.PathLike, ModelSource],
        repo_id: str,
        *,
        private: bool = False,
        revision: Optional[str] = None,
        create_pr: bool = False,
        commit_message: Optional[str] = None,
        license: Optional[str] = None,
        token: Optional[str] = None,
):
    """Export ``src`` and upload it to the model repo ``repo_id`` as one commit.

    Creates the repo if needed (``private`` applies only then) and the branch ``revision`` if it
    does not exist. Returns huggingface_hub's ``CommitInfo`` (``commit_url``, ``pr_url``).
    Pushing unchanged files makes no commit; the Hub's current head comes back instead.
    """
    check_repo_id(repo_id)
    revision = check_revision(revision)
    source = resolve_source(src)
    check_safetensors(source.model_dir / 'model.safetensors')
    portable_config(read_model_config(source.model_dir))  # fail before anything reaches the Hub
    check_weights_fit(source.model_dir)

    def fill(folder: Path, resolved_id: str) -> None:
        export(source, folder, repo_id=resolved_id, license=license, _link=True)

    command = _command('push', src if isinstance(src, (str, os.PathLike)) else source.model_dir, repo_id,
                       private, revision, create_pr, commit_message, license)
    return _upload(fill, repo_id, 'model', private, revision, create_pr,
                   commit_message or _commit_message(source), token, command)


def _upload(fill, repo_id: str, repo_type: str, private: bool, revision: Optional[str], create_pr: bool,
            commit_message: str, token: Optional[str], command: str):
    """Create the repo (and branch), let ``fill(folder, repo_id)`` write what goes up, commit it all at once.

    Transient faults are retried (see the module's docstring); ``command`` is what the last line
    tells the user to rerun when the tries run out.
    """
    from huggingface_hub import CommitOperationAdd

    api = _api(token)
    kind = '' if repo_type == 'model' else f'{repo_type} '
    branch = revision or 'main'

    def gave_up(resolved: str) -> Callable[[_Fault, int], str]:
        repo_url = f"{_hub_url()}/{'' if repo_type == 'model' else repo_type + 's/'}{resolved}"
        return lambda fault, tries: _gave_up_line(fault, tries, f'{kind}repo {resolved}', repo_url, branch,
                                                  create_pr, command)

    with _hub_errors(repo_id, revision, repo_type):
        repo_id = _retrying(lambda: _prepare_repo(api, repo_id, repo_type, private, revision), gave_up(repo_id))
        with tempfile.TemporaryDirectory(prefix=f'noisystudent-push-{repo_type}-') as tmp:
            folder = Path(tmp) / 'upload'
            fill(folder, repo_id)
            files = sorted(p for p in folder.rglob('*') if p.is_file())

            def commit():
                # new operations each time: a failed try leaves its own upload state behind
                operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=p)
                              for p in files]
                return api.create_commit(repo_id=repo_id, repo_type=repo_type, operations=operations,
                                         revision=revision, create_pr=create_pr, commit_message=commit_message)

            return _retrying(commit, gave_up(repo_id), may_repeat_commit=not create_pr)


def _command(name: str, src, repo_id: str, private: bool, revision: Optional[str], create_pr: bool,
             commit_message: Optional[str], license: Optional[str]) -> str:
    """The CLI command that repeats this push (a push from `run` too), for the line that asks to rerun it."""
    import shlex

    args = ['noisystudent', name, os.fspath(src), '--repo-id', repo_id]
    args += ['--private'] if private else []
    args += ['--revision', revision] if revision else []
    args += ['--create-pr'] if create_pr else []
    args += ['--commit-message', commit_message] if commit_message else []
    args += ['--license', license] if license else []
    return shlex.join(args)


def _commit_message(source: ModelSource) -> str:
    if source.stage:
        return f'Upload Noisy Student model ({source.stage}) with timm-noisystudent'
    return 'Upload model with timm-noisystudent'


# --- pseudo labels as a dataset ------------------------------------------------------------------


def push_labels(
        labels_dir: Union[str, os.PathLike],
        repo_id: str,
        *,
        private: bool = False,
        revision: Optional[str] = None,
        create_pr: bool = False,
        commit_message: Optional[str] = None,
        license: Optional[str] = None,
        token: Optional[str] = None,
):
    """Upload a pseudo-label directory (data/*.parquet, stats.json, confidence.png + a dataset card)
    to the dataset repo ``repo_id`` as one commit. ``datasets.load_dataset(repo_id)`` reads it back."""
    check_repo_id(repo_id)
    revision = check_revision(revision)
    labels_dir = Path(labels_dir).expanduser()
    stats, files = labels_files(labels_dir)

    def fill(folder: Path, resolved_id: str) -> None:
        (folder / 'data').mkdir(parents=True)
        for f in files:
            _put(f, folder / 'data' / f.name, link=True)
        if (labels_dir / 'confidence.png').is_file():
            _put(labels_dir / 'confidence.png', folder / 'confidence.png', link=True)
        (folder / 'stats.json').write_text(json.dumps(portable_stats(stats), indent=2), encoding='utf-8')
        card = labels_card(labels_dir, repo_id=resolved_id, license=license)
        (folder / 'README.md').write_text(str(card), encoding='utf-8')

    command = _command('push-labels', labels_dir, repo_id, private, revision, create_pr, commit_message, license)
    return _upload(fill, repo_id, 'dataset', private, revision, create_pr,
                   commit_message or 'Upload Noisy Student pseudo labels', token, command)


def _public_ref(value: Any) -> Any:
    """A Hub id or timm name as it is; a local path by its last part only."""
    if not isinstance(value, str) or not value:
        return value
    if value.startswith('hf-hub:'):
        return value
    path = Path(value).expanduser()
    if value.startswith(('.', '/', '~')) or path.exists() or value.count('/') > 1:
        return path.name
    return value


def portable_stats(stats: Dict[str, Any]) -> Dict[str, Any]:
    """A label directory's stats.json for the Hub: no local absolute paths, names only."""
    out = copy.deepcopy(stats)
    source = out.get('source')
    if isinstance(source, dict):
        source.pop('resolved', None)
        source['path'] = _public_ref(source.get('path'))
    identity = out.get('source_identity')
    if isinstance(identity, dict):
        identity['where'] = _public_ref(identity.get('where'))
    teacher = out.get('teacher')
    if isinstance(teacher, dict):
        teacher['spec'] = _public_ref(teacher.get('spec'))
    return out


# --- the cards of the ten registered variants ----------------------------------------------------


