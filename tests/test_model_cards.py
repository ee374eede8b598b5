"""model_cards/: the rendered cards of the ten registered variants, never stale."""
import importlib.util
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from timm_noisystudent import NS_RECIPES
from timm_noisystudent.cards import variant_cards

ROOT = Path(__file__).resolve().parents[1]
CARDS = ROOT / 'model_cards'


@pytest.fixture(scope='module')
def rendered():
    return variant_cards()


def test_model_cards_are_up_to_date(rendered):
    on_disk = {p.name: p.read_text(encoding='utf-8') for p in CARDS.glob('*.md')}
    assert set(on_disk) == {f'{name}.md' for name in NS_RECIPES}
    stale = sorted(name for name, text in rendered.items() if on_disk[name] != text)
    assert not stale, f'model_cards/ is stale ({", ".join(stale)}): run python scripts/render_model_cards.py'


@pytest.mark.parametrize('name', list(NS_RECIPES))
def test_each_card_holds_the_paper_numbers_recipe_and_usage(name):
    recipe = NS_RECIPES[name]
    card = ModelCard.load(CARDS / f'{name}.md')
    data = card.data
    assert data.library_name == 'timm' and data.pipeline_tag == 'image-classification'
    assert 'noisy-student' in data.tags and data.license == 'apache-2.0'
    assert data.datasets == ['imagenet-1k']
    (result,) = data.eval_results
    assert (result.dataset_type, result.dataset_split, result.metric_value) == ('imagenet-1k', 'validation',
                                                                                recipe.top1_ns)
    assert result.source_url == 'https://arxiv.org/abs/1911.04252'
    text = card.text
    assert f'| test resolution | {recipe.test_size} x {recipe.test_size} |' in text
    assert f'| dropout before the classifier | {recipe.dropout:g} |' in text
    assert (recipe.randaugment or 'none') in text
    assert f"timm.create_model('{name}', pretrained=True)" in text
    assert f'{recipe.base}.{recipe.tag}' in text
    if recipe.top1_baseline is not None:
        assert f'{recipe.top1_baseline:g}%' in text


def test_cards_load_back_unchanged(rendered):
    for name, text in rendered.items():
        card = ModelCard(text)
        assert str(card) == text, name  # metadata re-serialises to the same YAML
        assert card.data.model_name == name.removesuffix('.md')


def _script():
    spec = importlib.util.spec_from_file_location('render_model_cards', ROOT / 'scripts' / 'render_model_cards.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_render_script_writes_the_cards_and_check_catches_a_stale_one(tmp_path, monkeypatch, capsys):
    script = _script()
    out = tmp_path / 'cards'
    monkeypatch.setattr(sys, 'argv', ['render_model_cards.py', '--out', str(out)])
    assert script.main() == 0
    assert {p.name: p.read_text() for p in out.glob('*.md')} == variant_cards()
    monkeypatch.setattr(sys, 'argv', ['render_model_cards.py', '--check', '--out', str(out)])
    assert script.main() == 0
    (out / 'tf_efficientnet_b0_ns.md').write_text('stale\n')
    (out / 'unregistered.md').write_text('extra\n')
    assert script.main() == 1
    err = capsys.readouterr().err
    assert 'tf_efficientnet_b0_ns.md' in err and 'unregistered.md' in err
