"""Export, model cards and push, end to end against the local Hub (tests/hub_server.py).

The real huggingface_hub, timm and datasets clients talk to the server; nothing is mocked.
Fresh-process checks run plain timm in a subprocess that never imports this plugin.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from huggingface_hub import DatasetCard, ModelCard
from safetensors.torch import load_file, save_file

from conftest import hub_env
from timm_noisystudent import cli
from timm_noisystudent.config import DataSource, ModelStage, RunConfig, TrainConfig, UserError
from timm_noisystudent.files import save_config
from timm_noisystudent.cards import PLACEHOLDER_REPO_ID, model_card
from timm_noisystudent.hub import export, push
from timm_noisystudent.rundir import resolve_source
from timm_noisystudent.models import data_config_of, save_model

CLASSES = ['cat', 'dog', 'fish']
# the client's LFS upload goes through an httpx API that it deprecates itself
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


# --- builders: models and runs as the trainer and the pipeline write them ------------------------

def _tiny(seed: int, num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('test_efficientnet', num_classes=num_classes).eval()


def _save(model, directory: Path) -> Path:
    return save_model(model, directory, label_names=CLASSES, data_config=data_config_of(model, 32))


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def _metrics(top1: float, student: bool) -> dict:
    noise = {'randaugment': 'tf-m6-n2', 'dropout': 0.3, 'drop_path': 0.2, 'unlabeled_ratio': 3,
             'pseudo_batch_size': 48} if student else None
    return {'top1': top1, 'top5': 99.0, 'loss': 0.5, 'epoch': 1, 'step': 3, 'images_seen': 48, 'seconds': 1.0,
            'img_per_s': 48.0, 'labeled_images': 30, 'pseudo_images': 40 if student else 0,
            'model': 'test_efficientnet', 'num_classes': 3, 'image_size': 32, 'noise': noise,
            'ema_decay': 0.99, 'lr': 0.001, 'batch_size': 16}


def _stage(run: Path, name: str, seed: int, top1: float) -> None:
    _save(_tiny(seed), run / name / 'model')
    _write_json(run / name / 'metrics.json', _metrics(top1, student='student' in name))
    (run / name / 'DONE').touch()


def _labels(directory: Path) -> pa.Table:
    table = pa.table({
        'index': pa.array([0, 2, 3, 5, 5, 7], pa.int64()),
        'probs': pa.array([[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05],
                           [0.9, 0.05, 0.05], [0.1, 0.1, 0.8]], pa.list_(pa.float32())),
        'label': pa.array([0, 1, 2, 0, 0, 2], pa.int64()),
        'confidence': pa.array([0.8, 0.7, 0.6, 0.9, 0.9, 0.8], pa.float32()),
    })
    (directory / 'data').mkdir(parents=True, exist_ok=True)
    pq.write_table(table, directory / 'data' / 'rows-000000000000-000000000008.parquet')
    _write_json(directory / 'stats.json', {
        'source': {'path': 'org/unlabeled-pets', 'name': None, 'split': 'train', 'image_column': 'image'},
        'source_fingerprint': 'abc123',
        'teacher': {'spec': str(directory.parent / 'iter0-teacher' / 'model'), 'weights_sha256': 'f' * 64},
        'num_classes': 3, 'label_names': CLASSES, 'soft': True, 'temperature': 1.0, 'threshold': 0.3,
        'per_class': 'auto', 'per_class_target': 2, 'rows_labeled': 8, 'rows_before': 5, 'rows_after': 6,
        'duplicated': 1, 'counts_labeled': [3, 3, 2], 'counts_before': [2, 1, 2], 'counts_after': [2, 2, 2],
        'failed_images': [], 'failed_count': 0, 'seconds': 0.5, 'img_per_s': 16.0,
    })
    (directory / 'confidence.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    (directory / 'DONE').touch()
    return table


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A finished one-iteration run: teacher, labels, student, as pipeline.py lays it out."""
    run = tmp_path / 'runs' / 'pets'
    cfg = RunConfig(
        labeled=DataSource('org/labeled-pets', split='train[:30]'),
        unlabeled=DataSource('org/unlabeled-pets'),
        eval=DataSource('org/eval-pets', name='small', split='test'),
        teacher=ModelStage('test_efficientnet', pretrained=True, epochs=1, image_size=32),
        students=[ModelStage('test_efficientnet', epochs=1)],
        output=str(run),
    )
    save_config(cfg, run / 'config.yaml')
    _stage(run, 'iter0-teacher', seed=0, top1=81.25)
    _labels(run / 'iter1-labels')
    _stage(run, 'iter1-student', seed=1, top1=87.5)
    _write_json(run / 'summary.json', {'stages': [
        {'stage': 'iter0-teacher', 'model': 'test_efficientnet', 'teacher': None, 'top1': 81.25, 'top5': 99.0,
         'labeled_images': 30, 'pseudo_images': 0, 'seconds': 1.0},
        {'stage': 'iter1-labels', 'model': None, 'teacher': 'iter0-teacher', 'top1': None, 'top5': None,
         'labeled_images': None, 'pseudo_images': 6, 'seconds': 0.5},
        {'stage': 'iter1-student', 'model': 'test_efficientnet', 'teacher': 'iter0-teacher', 'top1': 87.5,
         'top5': 99.0, 'labeled_images': 30, 'pseudo_images': 6, 'seconds': 1.0},
    ]})
    return run


def _files(directory: Path) -> set:
    return {p.name for p in directory.iterdir()}


def _run_cli(args, capsys) -> tuple:
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def _plain_timm(script: str, *args, home: Path = None) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter that uses the local Hub; it must not import the plugin."""
    env = hub_env(OMP_NUM_THREADS='1', **({'HF_HOME': str(home)} if home else {}))
    code = textwrap.dedent(script) + "\nassert 'timm_noisystudent' not in sys.modules\n"
    proc = subprocess.run([sys.executable, '-c', code, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


_LOGITS = """
import json, sys
import timm, torch
from safetensors.torch import load_file, save_file
torch.set_num_threads(1)
x = load_file(sys.argv[1])['x']
out = {}
for i, spec in enumerate(sys.argv[3:]):
    model = timm.create_model(spec, pretrained=True).eval()
    with torch.no_grad():
        out[f'logits{i}'] = model(x).contiguous()
    out[f'names{i}'] = torch.tensor([len(model.pretrained_cfg.get('label_names') or [])])
save_file(out, sys.argv[2])
"""


# --- export --------------------------------------------------------------------------------------

def test_export_of_a_bare_model_dir_is_safetensors_config_and_card(tmp_path):
    src = _save(_tiny(0), tmp_path / 'model')
    out = export(src, tmp_path / 'export')

    assert _files(out) == {'model.safetensors', 'config.json', 'README.md'}
    assert (out / 'model.safetensors').read_bytes() == (src / 'model.safetensors').read_bytes()
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'test_efficientnet' and config['num_classes'] == 3
    assert config['label_names'] == CLASSES
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [3, 32, 32]
    assert {'crop_pct', 'interpolation', 'mean', 'std'} <= set(cfg)

    card = ModelCard.load(out / 'README.md')
    assert card.data.library_name == 'timm' and card.data.pipeline_tag == 'image-classification'
    assert 'noisy-student' in card.data.tags and card.data.license
    assert card.data.eval_results is None and card.data.base_model is None
    assert 'not recorded' in card.text and f'hf-hub:{PLACEHOLDER_REPO_ID}' in card.text
    assert 'Self-training with Noisy Student' in card.text
    assert not list(tmp_path.glob('.export*')), 'no temp dir may be left beside the export'


def test_export_of_a_run_is_its_final_student_with_lineage_and_pseudo_label_stats(run_dir, tmp_path):
    out = export(run_dir, tmp_path / 'export')
    student = run_dir / 'iter1-student' / 'model'
    assert (out / 'model.safetensors').read_bytes() == (student / 'model.safetensors').read_bytes()

    card = ModelCard.load(out / 'README.md')
    data = card.data
    assert data.datasets == ['org/labeled-pets', 'org/unlabeled-pets']
    assert data.base_model == 'timm/test_efficientnet.r160_in1k'  # the teacher's pretrained weights
    results = {r.metric_name: r for r in data.eval_results}
    assert results['Top-1 Accuracy'].metric_value == 87.5 and results['Top-5 Accuracy'].metric_value == 99.0
    top1 = results['Top-1 Accuracy']
    assert (top1.dataset_type, top1.dataset_config, top1.dataset_split) == ('org/eval-pets', 'small', 'test')

    text = card.text
    assert '| 0 | teacher | `test_efficientnet` | - | - | 81.25 | 99.00 |' in text
    assert '| 1 | student | `test_efficientnet` | `iter0-teacher` | 6 | 87.50 | 99.00 |' in text
    assert 'iteration 1 student' in text
    for row in ('| input noise (RandAugment) | tf-m6-n2 |', '| dropout | 0.3 |', '| stochastic depth | 0.2 |',
                '| unlabeled:labeled images per batch | 3 |', '| confidence threshold | 0.3 |',
                '| per-class target | 2 |', '| images kept | 6 |', '| duplicates added for rare classes | 1 |',
                '| dog | 1 | 2 |', '| labels | soft, T = 1 |'):
        assert row in text, row
    assert str(tmp_path) not in card.content, 'local paths stay off the card'


def test_a_card_gives_the_pseudo_share_a_student_took_not_only_the_configured_ratio(run_dir, tmp_path):
    # 6 pseudo-labeled rows beside 30 labeled ones: a step took 12 beside 16 (data.pseudo_batch_size)
    metrics_path = run_dir / 'iter1-student' / 'metrics.json'
    metrics = json.loads(metrics_path.read_text())
    metrics['noise']['pseudo_batch_size'] = 12
    metrics_path.write_text(json.dumps(metrics))
    text = ModelCard.load(export(run_dir, tmp_path / 'export') / 'README.md').text
    assert ('| unlabeled:labeled images per batch | 0.75 (12 pseudo-labeled beside 16 labeled a step: '
            'fewer pseudo-labeled rows than 3 per labeled row) |') in text


def test_export_accepts_stage_dirs_model_dirs_and_final(run_dir, tmp_path):
    teacher = ModelCard.load(export(run_dir / 'iter0-teacher', tmp_path / 'teacher') / 'README.md')
    assert 'This is the teacher' in teacher.text and '| 1 | student |' not in teacher.text
    assert 'None: this is a teacher' in teacher.text
    assert teacher.data.eval_results[0].metric_value == 81.25

    via_model_dir = export(run_dir / 'iter1-student' / 'model', tmp_path / 'student')
    assert ModelCard.load(via_model_dir / 'README.md').data.eval_results[0].metric_value == 87.5

    # final/ is the pipeline's export of the last stage; a stale one never shadows the stage
    student = (run_dir / 'iter1-student' / 'model' / 'model.safetensors').read_bytes()
    stale_final = _save(_tiny(7), run_dir / 'final')
    assert (export(run_dir, tmp_path / 'from-run') / 'model.safetensors').read_bytes() == student
    assert resolve_source(run_dir).stage == 'iter1-student'
    from_final = export(stale_final, tmp_path / 'from-final')
    assert (from_final / 'model.safetensors').read_bytes() == (stale_final / 'model.safetensors').read_bytes()
    assert '| 1 | student |' in (from_final / 'README.md').read_text()  # the run's lineage
    for name in ('iter0-teacher', 'iter1-student'):
        (run_dir / name / 'DONE').unlink()
    assert resolve_source(run_dir).model_dir == run_dir / 'final'


def test_cards_degrade_gracefully_when_parts_of_the_run_are_missing(run_dir, tmp_path):
    (run_dir / 'summary.json').unlink()
    (run_dir / 'iter1-labels' / 'stats.json').unlink()
    (run_dir / 'config.yaml').write_text('labeled: [not, a, mapping\n')  # unreadable YAML
    card = model_card(run_dir)
    assert '| 1 | student | `test_efficientnet` | `iter0-teacher` | 40 | 87.50 | 99.00 |' in card.text
    assert card.data.datasets is None and card.data.eval_results is None  # no eval source: no model-index
    assert 'No pseudo-label statistics' in card.text


def test_lineage_comes_from_the_stage_dirs_when_the_summary_is_missing_or_older(run_dir, tmp_path):
    _labels(run_dir / 'iter2-labels')
    _stage(run_dir, 'iter2-student', seed=2, top1=90.0)  # summary.json still ends at iter1
    card = model_card(run_dir)
    assert '| 2 | student | `test_efficientnet` | `iter1-student` | 40 | 90.00 | 99.00 |' in card.text
    assert card.data.eval_results[0].metric_value == 90.0
    (run_dir / 'summary.json').unlink()  # the pipeline exports final/ before it writes the summary
    assert '| 1 | student | `test_efficientnet` | `iter0-teacher` | 40 | 87.50 |' in model_card(run_dir).text


def test_export_replaces_an_earlier_export_and_refuses_other_directories(tmp_path):
    src = _save(_tiny(0), tmp_path / 'model')
    out = export(src, tmp_path / 'export')
    export(_save(_tiny(1), tmp_path / 'other'), out)
    assert (out / 'model.safetensors').read_bytes() == (tmp_path / 'other' / 'model.safetensors').read_bytes()

    (tmp_path / 'photos').mkdir()
    (tmp_path / 'photos' / 'cat.jpg').write_bytes(b'x')
    with pytest.raises(UserError, match='not an earlier export'):
        export(src, tmp_path / 'photos')
    assert _files(tmp_path / 'photos') == {'cat.jpg'}


def test_export_errors_are_user_errors(tmp_path, capsys):
    pickled = tmp_path / 'pickled'
    pickled.mkdir()
    (pickled / 'config.json').write_text(json.dumps({'architecture': 'test_efficientnet', 'num_classes': 3}))
    (pickled / 'pytorch_model.bin').write_bytes(b'not loaded')
    with pytest.raises(UserError, match='pickled'):
        export(pickled, tmp_path / 'out')
    with pytest.raises(UserError, match='does not exist'):
        export(tmp_path / 'missing', tmp_path / 'out')
    empty_run = tmp_path / 'run'
    _write_json(empty_run / 'summary.json', {'stages': []})
    with pytest.raises(UserError, match='no finished stage'):
        export(empty_run, tmp_path / 'out')
    (pickled / 'model.safetensors').write_bytes(b'\x00' * 16)
    code, out, err = _run_cli(['export', str(pickled), str(tmp_path / 'out')], capsys)
    assert code == 2 and err.startswith('error: ') and err.count('\n') == 1 and 'safetensors' in err
    assert not (tmp_path / 'out').exists()


def test_cards_validate_against_the_hub_and_load_back_the_same(hub_server, run_dir, tmp_path):
    card = model_card(run_dir, repo_id='org/pets')
    card.validate()  # POST /api/validate-yaml
    out = export(run_dir, tmp_path / 'export', repo_id='org/pets')
    loaded = ModelCard.load(out / 'README.md')
    assert loaded.data.to_dict() == card.data.to_dict()
    assert loaded.data.eval_results == card.data.eval_results
    assert "timm.create_model('hf-hub:org/pets', pretrained=True)" in loaded.text
    assert PLACEHOLDER_REPO_ID not in loaded.text
    assert hub_server.unhandled == []


# --- push ----------------------------------------------------------------------------------------

def test_train_export_push_then_plain_timm_loads_identical_logits(hub_server, tmp_path, capsys, caplog):
    """Done-when 1: train a tiny model, export it, push it; a fresh process without the plugin loads it."""
    from digits import digits_arrays, write_image_folder
    from timm_noisystudent.engine import train

    images, labels = digits_arrays(32)
    data = write_image_folder(tmp_path / 'digits', images[:40], labels[:40])
    trained = tmp_path / 'train'
    train(ModelStage(model='test_efficientnet', epochs=1, image_size=32), str(data), trained,
          eval_data=str(data), train_cfg=TrainConfig(batch_size=16, num_workers=0, max_steps=3), progress=False)

    repo_id = hub_server.unique_repo_id('digits')
    code, out, err = _run_cli(['export', str(trained), str(tmp_path / 'export')], capsys)
    assert code == 0, err
    printed = out + err
    code, out, err = _run_cli(['push', str(tmp_path / 'export'), '--repo-id', repo_id], capsys)
    assert code == 0, err
    printed += out + err
    commit = hub_server.commits('model', repo_id)[0]
    assert f'{hub_server.url}/{repo_id}/commit/{commit.oid}' in out
    assert set(hub_server.files('model', repo_id)) == {'.gitattributes', 'model.safetensors', 'config.json',
                                                      'README.md'}
    pushed_card = hub_server.files('model', repo_id)['README.md'].decode()
    assert f"hf-hub:{repo_id}" in pushed_card and PLACEHOLDER_REPO_ID not in pushed_card

    torch.manual_seed(0)
    save_file({'x': torch.randn(2, 3, 32, 32)}, tmp_path / 'x.safetensors')
    _plain_timm(_LOGITS + """
from huggingface_hub import ModelCard
card = ModelCard.load(sys.argv[3][len('hf-hub:'):])
json.dump(card.data.to_dict(), open(sys.argv[2] + '.card.json', 'w'))
""", tmp_path / 'x.safetensors', tmp_path / 'logits.safetensors', f'hf-hub:{repo_id}',
                f'local-dir:{tmp_path / "export"}', home=tmp_path / 'fresh-hf-home')
    logits = load_file(tmp_path / 'logits.safetensors')
    torch.set_num_threads(1)
    model = timm.create_model(f'local-dir:{trained / "model"}', pretrained=True).eval()
    with torch.no_grad():
        expected = model(load_file(tmp_path / 'x.safetensors')['x'])
    assert torch.equal(logits['logits0'], expected) and torch.equal(logits['logits1'], expected)
    assert int(logits['names0']) == 10  # label_names travel with config.json

    card = json.loads((tmp_path / 'logits.safetensors.card.json').read_text())
    assert card['library_name'] == 'timm' and 'noisy-student' in card['tags']
    assert card == ModelCard.load(tmp_path / 'export' / 'README.md').data.to_dict()

    # the token is sent, never shown or stored
    token = hub_server.token
    written = [p for p in tmp_path.rglob('*') if p.is_file()]
    assert written and not [p for p in written if token.encode() in p.read_bytes()]
    assert token not in printed + caplog.text
    assert not [name for name, data in hub_server.files('model', repo_id).items() if token.encode() in data]
    assert _files(tmp_path / 'export') == {'model.safetensors', 'config.json', 'README.md'}  # no pickles


def test_random_weights_pushed_as_timm_ns_repo_load_through_the_registered_entrypoint(hub_server, tmp_path):
    """Done-when 2: tf_efficientnet_b0_ns resolves to timm/tf_efficientnet_b0.ns_jft_in1k on the Hub."""
    torch.manual_seed(1234)
    model = timm.create_model('tf_efficientnet_b0')
    with torch.no_grad():
        model.classifier.bias.uniform_(-1, 1)  # content no earlier push in this session had
    src = save_model(model, tmp_path / 'random')
    info = push(src, 'timm/tf_efficientnet_b0.ns_jft_in1k')
    assert info.commit_url.endswith(hub_server.commits('model', 'timm/tf_efficientnet_b0.ns_jft_in1k')[0].oid)

    hub_server.clear_log()
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent("""
        import sys, timm, timm_noisystudent
        from safetensors.torch import save_file
        model = timm.create_model('tf_efficientnet_b0_ns', pretrained=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
        """), str(tmp_path / 'loaded.safetensors')],
        env=hub_env(OMP_NUM_THREADS='1', HF_HOME=str(tmp_path / 'fresh-hf-home')),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = load_file(tmp_path / 'loaded.safetensors')
    pushed = load_file(src / 'model.safetensors')
    assert loaded.keys() == pushed.keys()
    assert all(torch.equal(loaded[k], pushed[k]) for k in pushed)
    assert any('/timm/tf_efficientnet_b0.ns_jft_in1k/resolve/' in r.path for r in hub_server.requests)


def test_push_labels_then_load_dataset(hub_server, run_dir, capsys):
    """Done-when 3: a pseudo-label directory becomes a dataset repo that load_dataset reads."""
    import datasets

    repo_id = hub_server.unique_repo_id('pets-labels')
    code, out, err = _run_cli(['push-labels', str(run_dir / 'iter1-labels'), '--repo-id', repo_id], capsys)
    assert code == 0, err
    assert repo_id in out and '/commit/' in out
    files = hub_server.files('dataset', repo_id)
    assert set(files) == {'.gitattributes', 'README.md', 'stats.json', 'confidence.png',
                          'data/rows-000000000000-000000000008.parquet'}
    assert len(hub_server.commits('dataset', repo_id)) == 2  # initial commit + one push

    loaded = datasets.load_dataset(repo_id, split='train')
    expected = pq.read_table(run_dir / 'iter1-labels' / 'data' / 'rows-000000000000-000000000008.parquet')
    assert loaded.num_rows == expected.num_rows
    assert loaded.to_dict()['index'] == expected.to_pydict()['index']
    assert loaded.to_dict()['label'] == expected.to_pydict()['label']

    card = DatasetCard(files['README.md'].decode())
    assert 'noisy-student' in card.data.tags and card.data.source_datasets == ['org/unlabeled-pets']
    assert "load_dataset('org/unlabeled-pets', split='train')" in card.text
    assert '| per-class target | 2 |' in card.text


def test_push_twice_makes_two_commits_the_second_with_the_updated_card(hub_server, run_dir):
    """Done-when 4."""
    repo_id = hub_server.unique_repo_id('pets')
    first = push(run_dir, repo_id, commit_message='First push')
    push(run_dir, repo_id)  # nothing changed: no commit
    assert len(hub_server.commits('model', repo_id)) == 2

    metrics = json.loads((run_dir / 'iter1-student' / 'metrics.json').read_text())
    _write_json(run_dir / 'iter1-student' / 'metrics.json', dict(metrics, top1=91.25))
    summary = json.loads((run_dir / 'summary.json').read_text())
    summary['stages'][-1]['top1'] = 91.25
    _write_json(run_dir / 'summary.json', summary)
    second = push(run_dir, repo_id, commit_message='Second push')

    commits = hub_server.commits('model', repo_id)
    assert [c.title for c in commits] == ['Second push', 'First push', 'initial commit']
    assert second.oid == commits[0].oid and first.oid == commits[1].oid
    old_card, new_card = (c.files['README.md'].content.decode() for c in commits[:2][::-1])
    assert 'value: 87.5' in old_card and 'value: 91.25' in new_card
    assert commits[0].files['model.safetensors'].sha256 == commits[1].files['model.safetensors'].sha256


def test_push_to_a_new_branch_and_as_a_pull_request(hub_server, run_dir, capsys):
    repo_id = hub_server.unique_repo_id('pets')
    code, out, err = _run_cli(['push', str(run_dir), '--repo-id', repo_id, '--revision', 'dev'], capsys)
    assert code == 0, err
    assert 'model.safetensors' in hub_server.files('model', repo_id, revision='dev')
    assert set(hub_server.files('model', repo_id)) == {'.gitattributes'}  # main untouched

    code, out, err = _run_cli(['push', str(run_dir), '--repo-id', repo_id, '--create-pr'], capsys)
    assert code == 0, err
    assert 'pull request:' in out
    assert 'README.md' in hub_server.files('model', repo_id, revision='refs/pr/1')


def test_pushing_a_bare_export_fills_in_the_repo_id(hub_server, run_dir, tmp_path):
    out = export(run_dir, tmp_path / 'export')
    (out / 'README.md').write_text((out / 'README.md').read_text() + '\nA note of my own.\n')
    repo_id = hub_server.unique_repo_id('pets')
    push(out, repo_id)
    card = hub_server.files('model', repo_id)['README.md'].decode()
    assert f"hf-hub:{repo_id}" in card and PLACEHOLDER_REPO_ID not in card
    assert 'A note of my own.' in card and '| 1 | student |' in card


@pytest.mark.parametrize('repo_id', ['bad//id', 'org/a--b', 'org/name/extra', 'org/name.git', '-org/name', ''])
def test_bad_repo_ids_fail_before_any_request(hub_server, tmp_path, capsys, repo_id):
    code, out, err = _run_cli(['push', str(tmp_path), f'--repo-id={repo_id}'], capsys)
    assert code == 2 and err.startswith('error: ') and err.count('\n') == 1
    assert 'repo id' in err or '--repo-id' in err
    code, out, err = _run_cli(['push-labels', str(tmp_path), f'--repo-id={repo_id}'], capsys)
    assert code == 2
    assert hub_server.requests == []


@pytest.mark.parametrize('revision', ['bad rev', 'a..b', 'dev:x', 'dev/', '0' * 40])
def test_bad_revisions_fail_before_any_request(hub_server, tmp_path, capsys, revision):
    code, out, err = _run_cli(['push', str(tmp_path), '--repo-id', 'org/pets', f'--revision={revision}'], capsys)
    assert code == 2 and err.startswith('error: ') and err.count('\n') == 1 and '--revision' in err
    assert hub_server.requests == []


def test_hub_errors_are_one_line_messages_that_say_what_to_do(hub_server, run_dir, capsys, monkeypatch):
    """Done-when 5: no token, 401, 403, 404."""
    token = hub_server.token
    repo_id = hub_server.unique_repo_id('pets')
    args = ['push', str(run_dir), '--repo-id', repo_id]

    with monkeypatch.context() as m:
        m.delenv('HF_TOKEN')
        code, out, err = _run_cli(args, capsys)
        assert code == 2 and 'no Hugging Face token' in err and 'HF_TOKEN' in err
        code, out, err = _run_cli(['push-labels', str(run_dir / 'iter1-labels'), '--repo-id', repo_id], capsys)
        assert code == 2 and 'no Hugging Face token' in err
    assert hub_server.requests == []

    hub_server.rejected_tokens.add(token)
    code, out, err = _run_cli(args, capsys)
    assert code == 2 and '401' in err and 'hf auth login' in err
    hub_server.rejected_tokens.clear()

    hub_server.create_repo('model', repo_id)
    hub_server.read_only_repos.add(('model', repo_id))
    code, out, err = _run_cli(args, capsys)
    assert code == 2 and '403' in err and 'write access' in err
    hub_server.read_only_repos.clear()

    code, out, err = _run_cli(args + ['--revision', 'refs/pr/99'], capsys)
    assert code == 2 and '404' in err and 'refs/pr/99' in err

    code, out, err = _run_cli(['push-labels', str(run_dir), '--repo-id', repo_id], capsys)
    assert code == 2 and 'not a pseudo-label directory' in err

    assert len(hub_server.commits('model', repo_id)) == 1  # nothing was pushed
    for line in capsys.readouterr():
        assert token not in line


def test_cli_exit_code_2_in_a_real_process(hub_server, tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'timm_noisystudent', 'push', str(tmp_path), '--repo-id', 'a..b'],
                          env=hub_env(OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith('error: invalid repo id') and proc.stderr.count('\n') == 1
