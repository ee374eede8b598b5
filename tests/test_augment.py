import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp, RandAugment
from torchvision.transforms import ColorJitter

from timm_noisystudent import UserError, augment


def _image(size, seed=0):
    # a gradient plus noise, inside [20, 240] so that every op has something to change
    rng = np.random.RandomState(seed)
    ramp = np.linspace(20, 200, size)[None, :, None]
    pixels = ramp + rng.randint(0, 41, (size, size, 3))
    pixels[..., 1] = pixels[..., 1][:, ::-1]
    return Image.fromarray(pixels.astype(np.uint8))


def _seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _ops_by_name(magnitude, size, **kwargs):
    return {op.name: op for op in augment.tf_rand_augment_ops(magnitude, size, **kwargs)}


def _data_config(size):
    return dict(
        input_size=(3, size, size), interpolation='bicubic', mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), crop_pct=0.875, crop_mode='center')


@pytest.mark.parametrize('spec', [None, '', 'none', ' None '])
def test_no_noise_specs_parse_to_none(spec):
    assert augment.parse_noise_spec(spec) is None
    assert augment.noise_transform(spec, 224) is None


@pytest.mark.parametrize('spec, magnitude, num_ops', [
    ('tf', 27, 2),
    ('tf-m15-n2', 15, 2),
    ('tf-m15', 15, 2),
    ('tf-n3-m0', 0, 3),
    (' tf-m27-n1 ', 27, 1),
])
def test_tf_specs_parse(spec, magnitude, num_ops):
    parsed = augment.parse_noise_spec(spec)
    assert (parsed.kind, parsed.magnitude, parsed.num_ops) == ('tf', magnitude, num_ops)


@pytest.mark.parametrize('spec', [
    'rand', 'rand-m9-n2-mstd0.5', 'rand-m9-n2-mmax27-p1.0', 'rand-m7-inc1-tweights',
])
def test_rand_specs_parse(spec):
    parsed = augment.parse_noise_spec(spec)
    assert parsed.kind == 'rand' and parsed.config == spec


@pytest.mark.parametrize('spec', [
    'tf-m28', 'tf-m15-n0', 'tf-x3', 'tf-m15-m9', 'tf-m9.5', 'tf-', 'tf-m',
    'rand-q3', 'rand-foo', 'rand-m9x', 'randaugment', 'autoaug', 'TF-m9', 'original', 15,
])
def test_bad_specs_raise_one_line_help(spec):
    with pytest.raises(UserError) as info:
        augment.parse_noise_spec(spec)
    assert isinstance(info.value, ValueError)  # library callers may catch ValueError
    message = str(info.value)
    assert '\n' not in message and 'tf-m15-n2' in message and 'rand-m9-n2-mstd0.5' in message
    with pytest.raises(ValueError):
        augment.noise_transform(spec, 224)


@pytest.mark.parametrize('size', [32, 224])
@pytest.mark.parametrize('magnitude', [0, 9, 27])
@pytest.mark.parametrize('small_image_max', [64, 0])
def test_every_op_keeps_size_and_mode(size, magnitude, small_image_max):
    img = _image(size)
    ops = augment.tf_rand_augment_ops(magnitude, size, small_image_max=small_image_max)
    if small_image_max == 0:
        assert [op.name for op in ops] == list(augment.TF_OPS)
    _seed(0)
    for op in ops:
        out = op(img)
        assert out.size == (size, size) and out.mode == 'RGB', op.name


@pytest.mark.parametrize('size', [32, 224])
def test_every_op_changes_a_textured_image(size):
    img = _image(size)
    _seed(0)
    for op in augment.tf_rand_augment_ops(9, size, small_image_max=0):
        assert op(img).tobytes() != img.tobytes(), op.name


@pytest.mark.parametrize('size', [32, 224])
def test_two_ops_always_applied_change_the_image(size):
    img = _image(size)
    transform = augment.noise_transform('tf-m9-n2', size)
    assert isinstance(transform, RandAugment) and transform.num_layers == 2
    for seed in range(20):
        _seed(seed)
        out = transform(img)
        assert out.size == img.size and out.mode == 'RGB'
        assert out.tobytes() != img.tobytes(), seed


def _filled_pixels(img, fill=(0, 0, 0)):
    return int(np.all(np.asarray(img) == fill, axis=-1).sum())


@pytest.mark.parametrize('size', [32, 224])
def test_cutout_fills_a_square_proportional_to_size(size):
    white = Image.new('RGB', (size, size), (255, 255, 255))
    side = 2 * int(0.25 * size / 2)
    counts = []
    for seed in range(30):
        _seed(seed)
        counts.append(_filled_pixels(augment.cutout(white, 0.25, fillcolor=(0, 0, 0))))
    # clipped at the border sometimes, as the official op; never bigger than the square
    assert 0 < min(counts) and max(counts) == side * side
    assert side / size == pytest.approx(0.25, abs=1 / size)


@pytest.mark.parametrize('size, small_image_max, side_pct', [
    (32, 64, 1 / 4),  # small policy: official size // 8 pad at magnitude 10
    (224, 64, 80 / 224),  # full policy: official 2 * 40 px at 224
    (32, 0, 80 / 224),
])
def test_cutout_op_scales_with_image_size(size, small_image_max, side_pct):
    white = Image.new('RGB', (size, size), (255, 255, 255))
    op = _ops_by_name(10, size, fill=(0, 0, 0), small_image_max=small_image_max)['Cutout']
    counts = []
    for seed in range(30):
        _seed(seed)
        counts.append(_filled_pixels(op(white)))
    side = 2 * int(side_pct * size / 2)
    assert max(counts) == side * side


def test_small_policy_excludes_inverting_ops():
    for size, small_image_max in [(32, 64), (64, 64), (96, 128)]:
        names = set(_ops_by_name(27, size, small_image_max=small_image_max))
        assert not names & {'Invert', 'Solarize', 'SolarizeAdd'}
        assert {'Cutout', 'TranslateX', 'Rotate'} <= names
        assert augment.is_small_image(size, small_image_max)
    assert set(_ops_by_name(27, 224)) == set(augment.TF_OPS)
    assert set(_ops_by_name(27, (3, 65, 65))) == set(augment.TF_OPS)


def _line_shift(op, size):
    img = Image.new('RGB', (size, size))
    img.paste((255, 255, 255), (size // 2, 0, size // 2 + 1, size))
    out = np.asarray(op(img))[size // 2, :, 0]
    return abs(int(np.argmax(out)) - size // 2) if out.max() > 0 else size


@pytest.mark.parametrize('size, max_pct', [(32, 1 / 8), (64, 1 / 8), (224, 0.45), (600, 0.45)])
def test_translation_is_a_capped_fraction_of_size(size, max_pct):
    op = _ops_by_name(27, size, fill=(0, 0, 0))['TranslateX']
    shifts = set()
    for seed in range(6):
        _seed(seed)
        shifts.add(_line_shift(op, size))
    assert max(shifts) <= max_pct * size + 1
    assert max(shifts) >= max_pct * size - 1  # magnitude 27 reaches the cap


def test_small_policy_caps_magnitude():
    assert {op.magnitude for op in augment.tf_rand_augment_ops(27, 32)} == {10.0}
    assert {op.magnitude for op in augment.tf_rand_augment_ops(27, 224)} == {27.0}


def test_small_policy_posterize_keeps_detail_at_low_magnitude():
    # official Posterize keeps int(m / 10 * 4) bits: none at m=0, a black image
    img = _image(32)
    assert np.asarray(_ops_by_name(0, 32)['Posterize'](img)).max() > 0
    assert np.asarray(_ops_by_name(0, 32, small_image_max=0)['Posterize'](img)).max() == 0


def test_posterize_is_pils_for_one_to_seven_bits():
    from PIL import ImageOps
    img = _image(32)
    for bits in range(1, 8):
        for image in (img, img.convert('L')):
            assert augment._posterize(image, bits).tobytes() == ImageOps.posterize(image, bits).tobytes()
    assert augment._posterize(img, 8) is img and np.asarray(augment._posterize(img, 0)).max() == 0


def test_rand_spec_builds_timm_randaugment():
    transform = augment.noise_transform('rand-m9-n3-mstd0.5', 224)
    assert isinstance(transform, RandAugment) and transform.num_layers == 3
    assert all(isinstance(op, AugmentOp) and op.magnitude == 9 for op in transform.ops)
    _seed(0)
    assert transform(_image(224)).size == (224, 224)


def test_tf_spec_builds_official_op_list():
    transform = augment.noise_transform('tf-m15-n2', 224)
    assert [op.name for op in transform.ops] == list(augment.TF_OPS)
    assert 'Cutout' in augment.TF_OPS and len(augment.TF_OPS) == 16


@pytest.mark.parametrize('noise', [None, 'tf-m9-n2', 'rand-m9-n2-mstd0.5'])
def test_student_transform_gives_normalized_tensor(noise):
    config = _data_config(32)
    transform = augment.student_transform(config, noise)
    names = [type(t).__name__ for t in transform.transforms]
    assert not any(isinstance(t, ColorJitter) for t in transform.transforms)
    assert names[:2] == ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip']
    assert names[-2:] == ['MaybeToTensor', 'Normalize']
    assert ('RandAugment' in names) == (noise is not None)
    _seed(0)
    out = transform(_image(64))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # a uniform image at the mean color normalizes to zero
    mean_color = tuple(round(255 * m) for m in config['mean'])
    if noise is None:
        flat = transform(Image.new('RGB', (48, 40), mean_color))
        assert flat.abs().max() < 0.02


def test_student_transform_puts_tf_noise_between_flip_and_tensor():
    transform = augment.student_transform(_data_config(224), 'tf-m15-n2')
    noise = transform.transforms[2]
    assert isinstance(noise, RandAugment) and [op.name for op in noise.ops] == list(augment.TF_OPS)
    _seed(0)
    assert transform(_image(256)).shape == (3, 224, 224)


def test_teacher_transform_is_crop_and_flip_only():
    transform = augment.teacher_transform(_data_config(32))
    names = [type(t).__name__ for t in transform.transforms]
    assert names == [
        'RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'MaybeToTensor', 'Normalize']
    _seed(0)
    assert transform(_image(40)).shape == (3, 32, 32)


def test_train_transforms_take_timm_overrides():
    transform = augment.teacher_transform(_data_config(32), hflip=0.0, scale=(0.9, 1.0))
    names = [type(t).__name__ for t in transform.transforms]
    assert 'RandomHorizontalFlip' not in names
    assert transform.transforms[0].scale == (0.9, 1.0)


@pytest.mark.parametrize('spec', ['tf-m27-n2', 'rand-m9-n2-mstd0.5'])
def test_noise_is_reproducible_under_seeds(spec):
    img = _image(32)
    transform = augment.noise_transform(spec, 32, small_image_max=0)
    outputs = []
    for seed in (1, 1, 2):
        _seed(seed)
        outputs.append(b''.join(transform(img).tobytes() for _ in range(8)))
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_student_transform_is_reproducible_under_seeds():
    transform = augment.student_transform(_data_config(32), 'tf-m15-n2')
    img = _image(48)
    outputs = []
    for seed in (3, 3):
        _seed(seed)
        outputs.append(torch.stack([transform(img) for _ in range(4)]))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize('noise', [None, 'tf-m15-n2', 'rand-m9-n2-mstd0.5'])
@pytest.mark.parametrize('size', [32, 224])
def test_uint8_train_transforms_normalized_in_the_batch_are_timms_floats(noise, size):
    from timm_noisystudent.data import BatchNormalize
    config = _data_config(size)
    make = ((lambda **kw: augment.teacher_transform(config, **kw)) if noise is None
            else (lambda **kw: augment.student_transform(config, noise, **kw)))
    images = [_image(size + 16 * i) for i in range(4)]
    _seed(5)
    floats = torch.stack([make()(img) for img in images])
    _seed(5)
    small = torch.stack([make(uint8=True)(img) for img in images])
    assert small.dtype == torch.uint8 and small.shape == floats.shape
    # the same draws and the same arithmetic, once for the batch: bit for bit
    got = BatchNormalize(config['mean'], config['std'])(small)
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, floats)
    assert not BatchNormalize(config['mean'], config['std'], channels_last=False)(small).is_contiguous(
        memory_format=torch.channels_last)


def test_cutout_fills_grayscale_images():
    _seed(0)
    out = augment.cutout(Image.new('L', (32, 32), 255), 0.5, fillcolor=(0, 0, 0))
    assert out.mode == 'L' and (np.asarray(out) == 0).sum() > 0
