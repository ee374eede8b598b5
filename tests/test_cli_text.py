"""What the CLI says about itself: --version, help defaults that match the config, predict's header."""
import argparse
import re
from importlib.metadata import version

import pytest
from PIL import Image

from timm_noisystudent.cli import build_parser, main
from timm_noisystudent.config import LabelsConfig, NoiseConfig, TrainConfig


def _sub(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError('no subcommands')


def _help(sub: str, flag: str) -> str:
    p = _sub(sub)
    formatter = p._get_formatter()
    (action,) = [a for a in p._actions if flag in a.option_strings]
    return ' '.join(formatter._expand_help(action).split())


def test_version_is_the_installed_distribution(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(['--version'])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"noisystudent {version('timm-noisystudent')}"


@pytest.mark.parametrize('sub, config', [('train', TrainConfig), ('train', NoiseConfig), ('label', LabelsConfig)])
def test_help_defaults_are_the_config_defaults(sub, config):
    """A flag named for a config field that says "default N" says the field's default."""
    fields = {f.name: f.default for f in config.__dataclass_fields__.values()}
    checked = 0
    for action in _sub(sub)._actions:
        if action.dest not in fields or not action.help:
            continue
        for said in re.findall(r'default (-?\d+(?:\.\d+)?(?:e-?\d+)?)\b', _help(sub, action.option_strings[0])):
            assert float(said) == float(fields[action.dest]), f'{sub} {action.option_strings[0]}: says {said}'
            checked += 1
    if config is not NoiseConfig:  # noise defaults come from the recipes, not numbers
        assert checked >= 2


def test_train_epochs_help_says_the_real_default():
    text = _help('train', '--epochs')
    from timm_noisystudent.config import PRESET_EPOCHS
    assert f"the preset's: {PRESET_EPOCHS['small-data']} from random weights, {PRESET_EPOCHS['finetune']} for a " \
        'pretrained teacher' in ' '.join(text.split()) and 'docs/how-it-works.md' in text


def test_num_workers_help_says_how_they_are_chosen():
    for sub in ('train', 'label'):
        text = _help(sub, '--num-workers')
        assert 'measured' in text and 'chosen for the image size' not in text, sub
    assert '64 px' in _help('eval', '--num-workers')  # eval's count does follow the image size


def test_per_class_help_names_the_floor():
    text = _help('label', '--per-class')
    assert 'median' in text and 'half an even share' in text


def test_predict_prints_a_header_row(tmp_path, capsys):
    img = tmp_path / 'x.png'
    Image.new('RGB', (40, 40), (200, 30, 30)).save(img)
    assert main(['predict', str(img), str(img), '--model', 'test_efficientnet', '--no-pretrained',
                 '--top-k', '2']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ['image', 'rank', 'probability', 'class', 'label']
    assert len(lines) == 1 + 2 * 2
    assert lines[1].startswith(str(img)) and lines[1].split()[1] == '1' and '%' in lines[1]
    assert lines[2].split()[0] == '2'  # the image is named on its first row only


def test_progress_bars_in_a_log_write_at_most_a_line_a_minute_and_nothing_for_a_short_step():
    from timm_noisystudent.runtime import progress_bar
    import sys
    assert not sys.stderr.isatty()  # pytest captures it, as a log file would
    bar = progress_bar(total=3)
    assert bar.mininterval == 60.0
    bar.close()


def test_no_progress_silences_train_label_and_eval(tmp_path, capsys):
    from timm_noisystudent.demo import write_demo_data
    root = tmp_path / 'data'
    write_demo_data(root, per_class=2, n_test=10)
    common = ['--num-workers', '0', '--mixed-precision', 'no', '--no-progress']
    assert main(['train', '--data', str(root / 'labeled'), '--model', 'test_efficientnet', '--image-size', '32',
                 '--epochs', '1', '--batch-size', '8', '--min-steps', '0', '--output', str(tmp_path / 't'),
                 *common]) == 0
    assert main(['label', '--teacher', str(tmp_path / 't' / 'model'), '--data', str(root / 'unlabeled'),
                 '--output', str(tmp_path / 'l'), '--threshold', '0', *common]) == 0
    assert main(['eval', '--model', str(tmp_path / 't' / 'model'), '--data', str(root / 'labeled'), '--no-progress']) == 0, \
        capsys.readouterr().err
    out, err = capsys.readouterr()
    assert '\r' not in err and 'it/s' not in err and 'files/s' not in err and 'examples/s' not in err, err[-2000:]
    assert 'training img/s over the stage, evaluations included' in out
