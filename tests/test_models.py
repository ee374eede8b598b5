"""The ten tf_efficientnet_*_ns entrypoints, their recipes, and model loading."""
import json
import subprocess
import sys

import pytest
import timm
import torch
from PIL import Image

import timm_noisystudent
from timm_noisystudent.cli import main
from timm_noisystudent.config import UserError
from timm_noisystudent.models import NS_RECIPES, load_model, ns_recipe, save_model

NS_NAMES = sorted(NS_RECIPES)
CFG_FIELDS = ('hf_hub_id', 'input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'num_classes')


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-W', 'error', '-c', code], capture_output=True, text=True)


def test_import_emits_no_warnings():
    proc = _run(
        'import timm_noisystudent, timm, warnings\n'
        "m = timm.create_model('tf_efficientnet_b0_ns')\n"
        "assert m.pretrained_cfg['tag'] == 'ns_jft_in1k'\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ''


def test_the_plugin_import_pulls_in_neither_accelerate_nor_datasets():
    # a timm user who only wants the _ns entrypoints pays for timm, not for the trainer's libraries
    proc = _run('import sys, timm_noisystudent\n'
                "print(sorted(m for m in ('accelerate', 'datasets', 'pyarrow') if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == '[]'


def test_timm_alone_still_warns_so_the_plugin_is_what_silences_it():
    proc = _run("import timm; timm.create_model('tf_efficientnet_b0_ns')")
    assert proc.returncode != 0
    assert 'deprecated' in proc.stderr


def test_all_ten_listed():
    assert sorted(timm.list_models('tf_efficientnet_*_ns*')) == NS_NAMES
    assert sorted(timm.list_models('tf_efficientnet_*_ns*', pretrained=True)) == NS_NAMES
    assert len(NS_NAMES) == 10


@pytest.mark.parametrize('name', NS_NAMES)
def test_pretrained_cfg_equals_timm_ns_cfg(name):
    recipe = NS_RECIPES[name]
    theirs = timm.models.get_pretrained_cfg(f'{recipe.base}.{recipe.tag}')
    ours = timm.models.get_pretrained_cfg(name)
    for field in CFG_FIELDS:
        assert getattr(ours, field) == getattr(theirs, field), field
    with torch.device('meta'):
        model = timm.create_model(name)
    for field in CFG_FIELDS:
        assert model.pretrained_cfg[field] == getattr(theirs, field), field
    # exports must name the canonical architecture so plain timm loads them
    assert model.pretrained_cfg['architecture'] == recipe.base


@pytest.mark.parametrize('name', NS_NAMES)
def test_state_dict_keys_and_shapes_equal_timm(name):
    with torch.device('meta'):
        ours = timm.create_model(name).state_dict()
        theirs = timm.create_model(NS_RECIPES[name].base).state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


@pytest.mark.parametrize('name', [n for n in NS_NAMES if 'l2' not in n])
def test_outputs_equal_timm_with_the_same_weights(name):
    torch.manual_seed(0)
    theirs = timm.create_model(NS_RECIPES[name].base).eval()
    ours = timm.create_model(name).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(ours(x), theirs(x))


def test_recipes_follow_the_official_scripts():
    table = {  # DESIGN.md: RandAugment magnitude, dropout, unlabeled ratio
        'b0': (None, 0.2, 1), 'b1': (None, 0.2, 3), 'b2': (6, 0.3, 3), 'b3': (12, 0.3, 3),
        'b4': (15, 0.4, 3), 'b5': (18, 0.4, 3), 'b6': (24, 0.5, 3), 'b7': (27, 0.5, 3),
        'l2': (27, 0.5, 14), 'l2_ns_475': (27, 0.5, 14),
    }
    for key, expected in table.items():
        name = f'tf_efficientnet_{key}' if key.endswith('475') else f'tf_efficientnet_{key}_ns'
        r = NS_RECIPES[name]
        assert (r.randaugment_magnitude, r.dropout, r.unlabeled_ratio) == expected, name
        assert r.drop_path == 0.2
        if r.top1_baseline is not None:
            assert r.top1_ns > r.top1_baseline
    assert NS_RECIPES['tf_efficientnet_l2_ns'].unlabeled_ratio_last == 28
    assert NS_RECIPES['tf_efficientnet_b0_ns'].randaugment is None
    assert NS_RECIPES['tf_efficientnet_b7_ns'].randaugment == 'tf-m27-n2'
    assert ns_recipe('tf_efficientnet_b3') is NS_RECIPES['tf_efficientnet_b3_ns']
    assert ns_recipe('hf-hub:timm/tf_efficientnet_b3.ns_jft_in1k') is NS_RECIPES['tf_efficientnet_b3_ns']
    assert ns_recipe('resnet50') is None


def test_model_kwargs_pass_through():
    model = timm.create_model('tf_efficientnet_b0_ns', num_classes=7, in_chans=1, drop_rate=0.3, drop_path_rate=0.1)
    assert model.num_classes == 7
    assert model.conv_stem.in_channels == 1
    assert model.drop_rate == 0.3
    assert model.blocks[-1][-1].drop_path.drop_prob == pytest.approx(0.1 * 15 / 16)


def test_load_model_from_name_and_local_dir(tmp_path):
    model = load_model('test_efficientnet', pretrained=False, num_classes=3).eval()
    out = save_model(model, tmp_path / 'model', label_names=['a', 'b', 'c'])
    assert sorted(p.name for p in out.iterdir()) == ['config.json', 'model.safetensors']
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == 'test_efficientnet'
    assert cfg['label_names'] == ['a', 'b', 'c']
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
        assert torch.equal(load_model(out).eval()(x), expected)
        assert torch.equal(load_model(f'local-dir:{out}').eval()(x), expected)
    # plain timm, without the plugin, in a fresh process
    proc = subprocess.run([sys.executable, '-c', (
        'import sys, timm, torch\n'
        f"m = timm.create_model('local-dir:{out}', pretrained=True).eval()\n"
        "assert 'timm_noisystudent' not in sys.modules\n"
        f"print(m.pretrained_cfg['label_names'])")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "['a', 'b', 'c']" in proc.stdout


def test_load_model_errors(tmp_path):
    with pytest.raises(UserError, match='Did you mean: .*tf_efficientnet_b0_ns'):
        load_model('tf_efficientnet_b0_nss')
    with pytest.raises(UserError, match='does not exist'):
        load_model(str(tmp_path / 'nope') + '/')
    (tmp_path / 'pickled').mkdir()
    (tmp_path / 'pickled' / 'config.json').write_text('{"architecture": "test_efficientnet"}')
    (tmp_path / 'pickled' / 'pytorch_model.bin').write_bytes(b'not read')
    with pytest.raises(UserError, match='pickled'):
        load_model(tmp_path / 'pickled')


def test_checkpoint_with_wrong_shapes_names_keys(tmp_path):
    from safetensors.torch import save_file
    small = timm.create_model('test_efficientnet', num_classes=3)
    save_file(small.state_dict(), str(tmp_path / 'w.safetensors'))
    with pytest.raises(UserError, match='classifier.weight'):
        load_model('test_efficientnet', pretrained=False, num_classes=5, checkpoint=tmp_path / 'w.safetensors')


@pytest.fixture
def saved_model(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('test_efficientnet', num_classes=3)
    return save_model(model, tmp_path / 'model', label_names=['cat', 'dog', 'bird'])


def _image(path, mode='RGB', size=(40, 30)):
    Image.new(mode, size, color=128 if mode in ('L', 'P') else (200, 30, 60)[:len(mode)] or 1).save(path)
    return path


def test_predict_prints_names_and_probabilities(saved_model, tmp_path, capsys):
    img = _image(tmp_path / 'x.png')
    gray = _image(tmp_path / 'g.png', mode='L')
    assert main(['predict', str(img), str(gray), '--model', str(saved_model), '--json', '--top-k', '2']) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r['image'] for r in results] == [str(img), str(gray)]
    for r in results:
        assert len(r['predictions']) == 2
        assert {p['label'] for p in r['predictions']} <= {'cat', 'dog', 'bird'}
        assert r['predictions'][0]['probability'] >= r['predictions'][1]['probability']
    assert main(['predict', str(img), '--model', str(saved_model)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ['image', 'rank'] and out.splitlines()[1].startswith(str(img))
    assert len(out.splitlines()) == 4 and '%' in out


def test_predict_uses_imagenet_names_for_1000_classes(tmp_path, capsys):
    img = _image(tmp_path / 'x.jpg')
    assert main(['predict', str(img), '--model', 'test_efficientnet', '--no-pretrained', '--json']) == 0
    labels = {p['label'] for p in json.loads(capsys.readouterr().out)[0]['predictions']}
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    assert labels <= {info.index_to_description(i) for i in range(1000)}


def test_predict_bad_image_is_one_line_exit_2(saved_model, tmp_path):
    bad = tmp_path / 'bad.jpg'
    bad.write_text('this is not an image')
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_noisystudent', 'predict', str(bad), '--model', str(saved_model)],
        capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count('\n') == 1 and str(bad) in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_models_command_lists_ten(capsys):
    assert main(['models']) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NS_NAMES)
    assert '78.8' in out and '480.3' in out


def test_package_reexports():
    assert timm_noisystudent.load_model is load_model


def test_small_inputs_for_the_architecture_stride_are_warned_about():
    import timm

    from timm_noisystudent.models import final_feature_size, small_input_warning
    b0 = timm.create_model('tf_efficientnet_b0')
    assert final_feature_size(b0, 32) == 1 and final_feature_size(b0, 224) == 7
    message = small_input_warning(b0, 'tf_efficientnet_b0', 32)
    assert message.startswith('tf_efficientnet_b0 downsamples 32x, so 32 px inputs end in a 1x1 feature map')
    assert 'image_size (at least 64)' in message
    assert small_input_warning(b0, 'tf_efficientnet_b0', 64) is None
    assert small_input_warning(torch.nn.Linear(2, 2), 'linear', 8) is None  # no feature_info: nothing to say



def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_cropped_small_map_depthwise_trains_with_the_full_kernels_outputs_and_gradients(tmp_path):
    import copy

    from timm_noisystudent.models import crop_small_map_depthwise
    torch.manual_seed(0)
    b0 = timm.create_model('tf_efficientnet_b0', num_classes=10, drop_rate=0.0, drop_path_rate=0.0).double()
    cropped = copy.deepcopy(b0)
    # B0's twelve stride-1 depthwise convs (five 3x3, seven 5x5); the strided ones keep their kernels
    assert crop_small_map_depthwise(cropped) == 12
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.arange(4)  # maps down to 1x1
    loss, grads = _grads(b0, x, y)
    loss_c, grads_c = _grads(cropped, x, y)
    assert torch.allclose(loss, loss_c, rtol=1e-12, atol=0)
    assert grads.keys() == grads_c.keys()
    for name, g in grads.items():
        assert torch.allclose(g, grads_c[name], rtol=1e-9, atol=1e-12), name
    # a 5x5 conv on a 1x1 map: only its centre tap meets a pixel, in the full kernel as in the cropped one
    g = grads_c['blocks.5.3.conv_dw.weight']
    ring = torch.ones(5, 5, dtype=torch.bool)
    ring[2, 2] = False
    assert g[..., ring].abs().sum() == 0 and g[..., 2, 2].abs().sum() > 0
    # evaluation is the plain conv, and the export is plain timm's
    cropped.eval()
    with torch.no_grad():
        assert torch.equal(cropped(x), b0.eval()(x))
    save_model(cropped.float(), tmp_path / 'm')
    again = timm.create_model(f'local-dir:{tmp_path / "m"}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.allclose(again(x.float()), cropped(x.float()), rtol=1e-5, atol=1e-6)


def test_cropping_leaves_the_convs_it_cannot_crop_exactly_alone():
    from timm_noisystudent.models import crop_small_map_depthwise
    convs = torch.nn.Sequential(
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),   # strided
        torch.nn.Conv2d(8, 8, 3, padding=1),                       # dense
        torch.nn.Conv2d(8, 8, 5, padding=1, groups=8),             # not same-padded
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode='reflect'),
        torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),
        torch.nn.Conv2d(8, 8, 5, padding=2, groups=8)).double()    # the one it crops
    assert crop_small_map_depthwise(convs) == 1
    assert [type(m) is torch.nn.Conv2d for m in convs] == [True] * 5 + [False]
    conv = convs[5]
    for shape in [(2, 8, 3, 1), (2, 8, 1, 1), (2, 8, 2, 6), (2, 8, 7, 7)]:  # cropped to 5x1, 1x1, 3x5; 7x7 not
        x = torch.randn(*shape, dtype=torch.float64)
        ref = torch.nn.functional.conv2d(x, conv.weight, conv.bias, 1, 2, 1, 8)
        assert torch.allclose(conv(x), ref, rtol=1e-12, atol=1e-12), shape


def test_a_new_head_starts_at_zero_and_a_loaded_one_is_kept(tmp_path):
    from timm_noisystudent.models import zero_new_head
    torch.manual_seed(0)
    scratch = load_model('test_efficientnet', pretrained=False, num_classes=10)
    assert scratch.get_classifier().weight.abs().max() > 0.1  # timm's init: U(+-1/sqrt(10))
    assert zero_new_head(scratch, 'test_efficientnet', pretrained=False)
    head = scratch.get_classifier()
    assert head.weight.abs().max() == 0 and head.bias.abs().max() == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(scratch.eval()(x), torch.zeros(2, 10))  # every class starts at 1/C

    trained = load_model('test_efficientnet', pretrained=False, num_classes=10)
    save_model(trained, tmp_path / 'm')
    weights = trained.get_classifier().weight.clone()
    # the same classes: the directory's head is loaded and kept, as is a checkpoint's
    same = load_model(str(tmp_path / 'm'), num_classes=10)
    assert not zero_new_head(same, str(tmp_path / 'm'), pretrained=False)
    assert torch.equal(same.get_classifier().weight, weights)
    warm = load_model('test_efficientnet', pretrained=False, num_classes=10,
                      checkpoint=tmp_path / 'm' / 'model.safetensors')
    assert not zero_new_head(warm, 'test_efficientnet', pretrained=False, checkpoint=tmp_path / 'm' / 'model.safetensors')
    assert torch.equal(warm.get_classifier().weight, weights)
    # another class count: the backbone is loaded, the head is new and starts at zero
    other = load_model(str(tmp_path / 'm'), num_classes=3)
    assert zero_new_head(other, str(tmp_path / 'm'), pretrained=False)
    assert other.get_classifier().weight.abs().max() == 0
    assert torch.equal(other.conv_stem.weight, trained.conv_stem.weight)
