"""Push, push-labels and Hub downloads when the network fails, against the local Hub made to fail.

Each fault is injected by tests/hub_server.py (a status, a connection reset, a cut answer, a
delay); the real huggingface_hub and timm clients meet it. Every case ends either pushed after a
retry, with exactly one new commit, or with one error line (exit code 2) while the repo holds
nothing of the push. One commit is all or nothing, so there is no third outcome.
"""
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from hub_server import COMMIT, LFS_UPLOAD, RESOLVE

from conftest import error_line
from timm_noisystudent import cli, hub
from timm_noisystudent.models import data_config_of, save_model

# the client's LFS upload goes through an httpx API that it deprecates itself
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

MODEL_FILES = {'.gitattributes', 'model.safetensors', 'config.json', 'README.md'}


@pytest.fixture(autouse=True)
def short_waits(monkeypatch):
    """Retries wait a few milliseconds here (Retry-After still counts, up to the cap)."""
    monkeypatch.setattr(hub, 'PUSH_WAIT', 0.01)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    model = timm.create_model('test_efficientnet', num_classes=3)
    return save_model(model, tmp_path / 'model', label_names=['cat', 'dog', 'fish'],
                      data_config=data_config_of(model, 32))


@pytest.fixture
def labels_dir(tmp_path) -> Path:
    directory = tmp_path / 'labels'
    (directory / 'data').mkdir(parents=True)
    pq.write_table(pa.table({
        'index': pa.array([0, 1, 2], pa.int64()),
        'probs': pa.array([[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6]], pa.list_(pa.float32())),
        'label': pa.array([0, 1, 2], pa.int64()),
        'confidence': pa.array([0.8, 0.7, 0.6], pa.float32()),
    }), directory / 'data' / 'rows-000000000000-000000000003.parquet')
    (directory / 'stats.json').write_text(json.dumps({
        'source': {'path': 'org/unlabeled', 'name': None, 'split': 'train', 'image_column': 'image'},
        'num_classes': 3, 'label_names': ['cat', 'dog', 'fish'], 'soft': True, 'temperature': 1.0,
        'threshold': 0.3, 'per_class': 'auto', 'per_class_target': 1, 'rows_labeled': 3, 'rows_before': 3,
        'rows_after': 3, 'counts_before': [1, 1, 1], 'counts_after': [1, 1, 1], 'failed_count': 0,
    }))
    (directory / 'DONE').touch()
    return directory


def _cli(args, capsys, hub_server):
    """Run the CLI in this process: (exit code, stdout, stderr, the push's retry warnings).

    The token is never among what it prints."""
    code = cli.main(list(map(str, args)))
    out = capsys.readouterr()
    assert hub_server.token not in out.out + out.err
    retries = [line[len('warning: '):] for line in out.err.splitlines()
               if line.startswith('warning: ') and 'trying again in' in line]
    return code, out.out, out.err, retries


def _push(model_dir, repo_id, *extra):
    return ['push', model_dir, '--repo-id', repo_id, *extra]


def _pushed_commit(out: str) -> str:
    return out.strip().rsplit('/commit/', 1)[1]


# --- push: retried and pushed once ---------------------------------------------------------------

def test_a_500_on_the_commit_is_retried_and_pushes_one_commit(hub_server, model_dir, capsys):
    repo_id = hub_server.unique_repo_id('faults')
    fault = hub_server.fail('POST', COMMIT, status=500, times=1)
    code, out, err, warned = _cli(_push(model_dir, repo_id), capsys, hub_server)
    assert code == 0, err
    assert fault.hits == 1
    assert warned == ['the Hub answered 500 to the commit; trying again in 0.01 s (try 2 of 3).']
    commits = hub_server.commits('model', repo_id)
    assert len(commits) == 2 and _pushed_commit(out) == commits[0].oid
    assert set(hub_server.files('model', repo_id)) == MODEL_FILES
    assert hub_server.files('model', repo_id)['model.safetensors'] == (model_dir / 'model.safetensors').read_bytes()


def test_a_connection_reset_mid_commit_upload_is_retried(hub_server, model_dir, capsys):
    repo_id = hub_server.unique_repo_id('faults')
    fault = hub_server.drop('POST', COMMIT, after=0.5, times=1)
    code, out, err, warned = _cli(_push(model_dir, repo_id), capsys, hub_server)
    assert code == 0, err
    assert fault.hits == 1 and len(warned) == 1 and 'the connection to the Hub broke' in warned[0]
    assert len(hub_server.commits('model', repo_id)) == 2
    assert set(hub_server.files('model', repo_id)) == MODEL_FILES


def test_a_commit_whose_answer_is_lost_is_not_made_twice(hub_server, model_dir, capsys):
    """The Hub commits, then the connection drops before its answer arrives: the retry finds the
    files there, makes no second commit, and reports the one that was made."""
    repo_id = hub_server.unique_repo_id('faults')
    fault = hub_server.cut('POST', COMMIT, after=10, times=1)
    code, out, err, warned = _cli(_push(model_dir, repo_id), capsys, hub_server)
    assert code == 0, err
    assert fault.hits == 1 and len(warned) == 1
    commits = hub_server.commits('model', repo_id)
    assert len(commits) == 2 and _pushed_commit(out) == commits[0].oid


def test_a_reset_mid_lfs_upload_is_retried_by_huggingface_hub_alone(hub_server, model_dir, capsys):
    repo_id = hub_server.unique_repo_id('faults')
    fault = hub_server.drop('PUT', LFS_UPLOAD, after=0.5, times=1)
    code, out, err, warned = _cli(_push(model_dir, repo_id), capsys, hub_server)
    assert code == 0, err
    assert fault.hits == 1 and warned == []  # http_backoff retried the PUT; the push did not add tries
    assert len([r for r in hub_server.requests if r.method == 'PUT']) == 2
    assert hub_server.files('model', repo_id)['model.safetensors'] == (model_dir / 'model.safetensors').read_bytes()


def test_a_429_with_retry_after_waits_what_the_hub_asks(hub_server, model_dir, capsys):
    repo_id = hub_server.unique_repo_id('faults')
    fault = hub_server.fail('POST', COMMIT, status=429, retry_after=1, times=1)
    code, out, err, warned = _cli(_push(model_dir, repo_id), capsys, hub_server)
    assert code == 0, err
    assert fault.hits == 1
    assert warned == ['the Hub answered 429 to the commit; trying again in 1 s (try 2 of 3).']
    assert len(hub_server.commits('model', repo_id)) == 2


def test_a_slow_hub_still_gets_one_commit(hub_server, model_dir, capsys):
    repo_id = hub_server.unique_repo_id('faults')
    fault = hub_server.slow('POST', COMMIT, seconds=0.3)
    code, out, err, warned = _cli(_push(model_dir, repo_id), capsys, hub_server)
    assert code == 0, err
    assert fault.hits == 1 and warned == []
    assert len(hub_server.commits('model', repo_id)) == 2


def test_a_503_when_creating_the_repo_is_retried(hub_server, labels_dir, capsys):
    repo_id = hub_server.unique_repo_id('labels')
    fault = hub_server.fail('POST', r'^/api/repos/create$', status=503, times=2)
    code, out, err, warned = _cli(['push-labels', labels_dir, '--repo-id', repo_id], capsys, hub_server)
    assert code == 0, err
    assert fault.hits == 2 and len(warned) == 2 and 'the creation of the repo' in warned[0]
    assert 'stats.json' in hub_server.files('dataset', repo_id)


# --- push: the tries run out -------------------------------------------------------------------

def test_a_500_on_every_commit_ends_with_one_line_and_nothing_committed(hub_server, model_dir, capsys):
    repo_id = hub_server.unique_repo_id('faults')
    fault = hub_server.fail('POST', COMMIT, status=500, times=None)
    code, out, err, warned = _cli(_push(model_dir, repo_id), capsys, hub_server)
    assert code == 2 and out == ''
    line = error_line(err)
    assert line == (f'error: the Hub answered 500 to the commit, 3 tries in all; nothing was committed to repo '
                    f'{repo_id}; rerun `noisystudent push {model_dir} --repo-id {repo_id}` later (files already '
                    'uploaded are not sent again).')
    assert fault.hits == hub.PUSH_TRIES and len(warned) == hub.PUSH_TRIES - 1
    assert set(hub_server.files('model', repo_id)) == {'.gitattributes'}  # the repo exists; nothing of the push

    hub_server.clear_faults()
    hub_server.clear_log()
    code, out, err, warned = _cli(_push(model_dir, repo_id), capsys, hub_server)
    assert code == 0, err
    assert set(hub_server.files('model', repo_id)) == MODEL_FILES
    assert [r for r in hub_server.requests if r.method == 'PUT'] == []  # the weights went up the first time


def test_a_retry_after_beyond_the_cap_ends_at_once(hub_server, model_dir, capsys):
    repo_id = hub_server.unique_repo_id('faults')
    fault = hub_server.fail('POST', COMMIT, status=429, retry_after=3600, times=None)
    code, out, err, warned = _cli(_push(model_dir, repo_id), capsys, hub_server)
    assert code == 2
    line = error_line(err)
    assert 'answered 429 to the commit, asking to wait 3600 s' in line and 'after 3600 s' in line
    assert f'nothing was committed to repo {repo_id}' in line
    assert fault.hits == 1 and warned == []
    assert set(hub_server.files('model', repo_id)) == {'.gitattributes'}


def test_a_lost_answer_to_a_pull_request_is_not_retried(hub_server, model_dir, capsys):
    """Retrying would open a second pull request, so the push stops and says where to look."""
    repo_id = hub_server.unique_repo_id('faults')
    hub_server.create_repo('model', repo_id)
    fault = hub_server.cut('POST', COMMIT, after=10, times=None)
    code, out, err, warned = _cli(_push(model_dir, repo_id, '--create-pr'), capsys, hub_server)
    assert code == 2
    line = error_line(err)
    assert 'a pull request may have been opened' in line and f'{hub_server.url}/{repo_id}/discussions' in line
    assert fault.hits == 1 and len(hub_server.repo('model', repo_id).pull_requests) == 1
    assert set(hub_server.files('model', repo_id)) == {'.gitattributes'}  # main untouched


def test_push_labels_that_cannot_commit_names_its_own_command(hub_server, labels_dir, capsys):
    repo_id = hub_server.unique_repo_id('labels')
    hub_server.fail('POST', COMMIT, status=502, times=None)
    code, out, err, warned = _cli(['push-labels', labels_dir, '--repo-id', repo_id], capsys, hub_server)
    assert code == 2
    line = error_line(err)
    assert f'nothing was committed to dataset repo {repo_id}' in line
    assert f'rerun `noisystudent push-labels {labels_dir} --repo-id {repo_id}` later' in line
    assert set(hub_server.files('dataset', repo_id)) == {'.gitattributes'}


def test_a_commit_that_never_answers_says_where_to_look(hub_server, model_dir, capsys):
    repo_id = hub_server.unique_repo_id('faults')
    hub_server.create_repo('model', repo_id)
    hub_server.drop('POST', COMMIT, after=0.5, times=None)
    code, out, err, warned = _cli(_push(model_dir, repo_id, '--revision', 'main'), capsys, hub_server)
    assert code == 2
    line = error_line(err)
    assert 'the connection to the Hub broke during the commit' in line and '3 tries in all' in line
    assert f'the commit may have been made: look at {hub_server.url}/{repo_id}/commits/main' in line
    assert f'rerun `noisystudent push {model_dir} --repo-id {repo_id} --revision main` later either way' in line
    assert set(hub_server.files('model', repo_id)) == {'.gitattributes'}  # it was not


# --- downloads cut partway -----------------------------------------------------------------------

def test_a_download_cut_partway_is_never_taken_for_whole(hub_server, tmp_path, capsys):
    """huggingface_hub downloads into a temporary ``blobs/<etag>.<id>.incomplete`` that it renames
    only once whole and deletes when the download fails; within one run it resumes a cut download
    with a Range request. So a download that fails halfway ends with one line, leaves nothing in the
    cache that looks whole, and the next run downloads the file again and loads the exact weights."""
    from PIL import Image

    torch.manual_seed(0)
    model = timm.create_model('test_efficientnet', num_classes=12000)  # weights > huggingface_hub's 10 MiB reads
    src = save_model(model, tmp_path / 'big', data_config=data_config_of(model, 32))
    repo_id = hub_server.unique_repo_id('cut')
    assert cli.main(['push', str(src), '--repo-id', repo_id]) == 0
    image = tmp_path / 'x.png'
    Image.new('RGB', (32, 32), (120, 30, 200)).save(image)
    weights = (src / 'model.safetensors').read_bytes()
    weights_path = RESOLVE + 'main/model.safetensors$'

    cut = hub_server.cut('GET', weights_path, after=len(weights) - 1000, times=1)
    refused = hub_server.fail('GET', weights_path, status=500, times=None)
    capsys.readouterr()
    hub_server.clear_log()
    code, out, err, warned = _cli(['predict', image, '--model', f'hf-hub:{repo_id}'], capsys, hub_server)
    assert code == 2
    line = error_line(err)
    assert f'the download of hf-hub:{repo_id} failed' in line and 'answered 500' in line
    assert 'run the same command again' in line
    assert cut.hits == 1 and refused.hits == 1
    gets = [r.headers.get('range') for r in hub_server.requests if r.method == 'GET' and 'model.safetensors' in r.path]
    assert gets[0] is None and gets[1].startswith('bytes=') and gets[1] != 'bytes=0-'  # it resumed, then failed

    cache = Path(hub_server.home) / 'hub' / f"models--{repo_id.replace('/', '--')}"
    sha = hashlib.sha256(weights).hexdigest()
    assert not [p for p in (cache / 'blobs').iterdir() if p.name.startswith(sha)]  # nothing whole-looking, no leftover
    assert not list(cache.glob('snapshots/*/model.safetensors'))

    hub_server.clear_faults()
    code, out, err, warned = _cli(['predict', image, '--model', f'hf-hub:{repo_id}'], capsys, hub_server)
    assert code == 0, err
    assert (cache / 'blobs' / sha).read_bytes() == weights
    assert [p.name for p in (cache / 'blobs').iterdir() if p.name.startswith(sha)] == [sha]


# --- export: the weights must fit config.json (N27), and config.json must be JSON (E02) ----------

def _variant(model_dir: Path, tmp_path: Path, name: str, config=None, tensors=None) -> Path:
    """A copy of ``model_dir`` with its config.json or its tensors changed."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / name
    out.mkdir()
    cfg = json.loads((model_dir / 'config.json').read_text())
    (out / 'config.json').write_text(json.dumps(config(cfg) if config else cfg))
    state = load_file(model_dir / 'model.safetensors')
    save_file(tensors(state) if tensors else state, out / 'model.safetensors')
    return out


def _more_classes(cfg):
    cfg['num_classes'] = cfg['model_args']['num_classes'] = cfg['pretrained_cfg']['num_classes'] = 4
    cfg['label_names'] = cfg['label_names'] + ['bird']
    return cfg


@pytest.mark.parametrize('name,config,tensors,said', [
    ('nc_mismatch', _more_classes, None, 'size mismatch for classifier'),
    ('extra_tensor', None, lambda s: dict(s, **{'backdoor.weight': torch.zeros(3)}), 'Unexpected key'),
    ('missing_tensor', None, lambda s: {k: v for k, v in s.items() if k != 'classifier.bias'}, 'Missing key'),
    ('wrong_arch', lambda c: dict(c, architecture='resnet18'), None, 'conv_stem'),
])
def test_export_and_push_refuse_weights_that_do_not_fit_config_json(hub_server, model_dir, tmp_path, capsys,
                                                                      name, config, tensors, said):
    src = _variant(model_dir, tmp_path, name, config, tensors)
    out = tmp_path / 'exported'
    assert cli.main(['export', str(src), str(out)]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f'error: the weights in {src} do not fit the architecture its config.json names')
    assert said in line
    assert not out.exists() and not list(tmp_path.glob('.exported.tmp-*'))

    hub_server.clear_log()
    assert cli.main(['push', str(src), '--repo-id', hub_server.unique_repo_id('unfit')]) == 2
    assert 'do not fit' in error_line(capsys.readouterr().err)
    assert hub_server.requests == []  # refused before anything reached the Hub


def test_export_says_a_config_json_that_is_not_json_is_not_valid_json(model_dir, tmp_path, capsys):
    bad = tmp_path / 'badjson'
    bad.mkdir()
    (bad / 'model.safetensors').write_bytes((model_dir / 'model.safetensors').read_bytes())
    (bad / 'config.json').write_text('{"architecture": "test_efficientnet",')
    good = tmp_path / 'good-export'
    assert cli.main(['export', str(model_dir), str(good)]) == 0
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    capsys.readouterr()

    assert cli.main(['export', str(bad), str(good)]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f'error: {bad / "config.json"} is not valid JSON (')
    assert 'line 1 column' in line and 'timm model config' not in line
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before  # the earlier export is intact
