""" Input noise for Noisy Student students: the RandAugment that timm lacks.

Two kinds of noise spec, both plain strings so they fit in a run config:

* ``rand-...``: timm's own RandAugment config string (``rand-m9-n2-mstd0.5``), built by timm.
* ``tf[-m<M>][-n<N>]``: RandAugment as the official Noisy Student code does it
  (google-research/noisystudent, randaugment.py): N ops per image picked uniformly with
  replacement, each always applied, magnitude M on the official 0..27 scale (divided by 10,
  so M > 10 extrapolates), Cutout among the ops. Defaults are the official flags: M=27, N=2.
* ``none`` / ``""`` / None: no input noise (the B0/B1 recipe).

Unlike the official code, translation and cutout are fractions of the image size, not pixels,
so the same spec means the same noise at any resolution. Small images (digits, CIFAR) get a
gentler policy, because the ImageNet noise copied to 32 px digits made students worse than
their teachers.

The individual ops are timm's (timm.data.auto_augment); only Cutout, and a Posterize that
accepts 0 bits, are new here.
"""
import functools
import random
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

from PIL import Image
from torchvision import transforms

from timm.data import create_transform
from timm.data.auto_augment import LEVEL_TO_ARG, NAME_TO_OP, RandAugment, rand_augment_transform
from timm.data.transforms import str_to_pil_interp

from .config import SMALL_IMAGE_MAX, UserError

__all__ = [
    'NoiseSpec', 'NoiseSpecError', 'TF_OPS', 'SMALL_IMAGE_EXCLUDED_OPS', 'parse_noise_spec',
    'is_small_image', 'cutout', 'tf_rand_augment_ops', 'tf_rand_augment_transform', 'noise_transform',
    'student_transform', 'teacher_transform',
]

# The official op list, in its order (Cutout is on by default there: FLAGS.cutout_op=True).
TF_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color', 'Contrast',
    'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'SolarizeAdd',
    'Cutout',
)
# These turn a small image into a different-looking one (a light digit on dark), not a noisy one.
SMALL_IMAGE_EXCLUDED_OPS = ('Invert', 'Solarize', 'SolarizeAdd')

_TF_LEVEL_DENOM = 10.  # official _MAX_LEVEL; timm's _LEVEL_DENOM is the same, so its level fns fit
_TF_MAX_MAGNITUDE = 27  # the largest magnitude in the official recipes (B7, L2) and its flag default
_TF_DEFAULT_NUM_OPS = 2
_FILL = (128, 128, 128)  # the official replace value for empty pixels and cutout
_DEFAULT_RESAMPLE = Image.Resampling.BILINEAR

_SPEC_HELP = (
    "use 'none', a timm RandAugment string such as 'rand-m9-n2-mstd0.5', "
    f"or 'tf-m<0..{_TF_MAX_MAGNITUDE}>-n<1..>' such as 'tf-m15-n2'"
)


class NoiseSpecError(UserError, ValueError):
    """A bad noise spec: a UserError for the CLI (exit code 2), a ValueError for library callers."""


@dataclass(frozen=True)
class NoiseSpec:
    """A parsed noise spec: kind 'rand' (timm's, kept as config) or 'tf' (magnitude, num_ops)."""
    kind: str
    config: str
    magnitude: Optional[int] = None
    num_ops: Optional[int] = None


@dataclass(frozen=True)
class _Policy:
    """Magnitude-to-strength scaling for one image-size class; fractions are of the image side."""
    ops: Tuple[str, ...]
    max_magnitude: float
    translate_pct: float  # shift at magnitude 10
    translate_max: float
    cutout_pct: float  # cutout side at magnitude 10
    cutout_max: float
    posterize: str  # name of timm's level fn for Posterize


# Official ImageNet constants are 100 px shift and a 2*40 px cutout at 224 px; as fractions of 224
# they reproduce the official pixels there. The caps keep M > 10 from pushing the content out of
# the frame (official M=27 at 224 px shifts by 270 px); 0.45 is also timm's translate_pct, and
# 0.5 is the side of the extra cutout the official small-image pipeline adds.
_FULL_POLICY = _Policy(
    ops=TF_OPS,
    max_magnitude=_TF_MAX_MAGNITUDE,
    translate_pct=100 / 224,
    translate_max=0.45,
    cutout_pct=80 / 224,
    cutout_max=0.5,
    posterize='Posterize',
)

# The official 32 px pipeline uses translate_const = cutout_const = size // 8 (4 px at 32, at
# magnitude 10). On top of that: no inverting ops, magnitude capped at 10 (rotate <= 30 deg,
# shear <= 0.3, enhance factor <= 1.9), and posterize keeps >= 4 bits (official Posterize keeps 0
# bits, a black image, at magnitude < 2.5).
_SMALL_POLICY = _Policy(
    ops=tuple(op for op in TF_OPS if op not in SMALL_IMAGE_EXCLUDED_OPS),
    max_magnitude=_TF_LEVEL_DENOM,
    translate_pct=1 / 8,
    translate_max=1 / 8,
    cutout_pct=1 / 4,
    cutout_max=1 / 4,
    posterize='PosterizeOriginal',
)


def parse_noise_spec(spec: Optional[str]) -> Optional[NoiseSpec]:
    """Parse a noise spec string; None for no noise. Raises NoiseSpecError for anything else."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise NoiseSpecError(f"noise spec must be a string, got {spec!r}: {_SPEC_HELP}")
    spec = spec.strip()
    if spec.lower() in ('', 'none'):
        return None
    sections = spec.split('-')
    if sections[0] == 'rand':
        _check_rand_sections(spec, sections[1:])
        return NoiseSpec(kind='rand', config=spec)
    if sections[0] == 'tf':
        return _parse_tf_sections(spec, sections[1:])
    raise NoiseSpecError(f"unknown noise spec {spec!r}: {_SPEC_HELP}")


def _check_rand_sections(spec: str, sections: Sequence[str]):
    # timm skips sections without a number silently and asserts on unknown keys; both are typos.
    for section in sections:
        if not re.fullmatch(r't\w+|[a-z]+\d+(\.\d*)?', section):
            raise NoiseSpecError(f"bad section {section!r} in noise spec {spec!r}: {_SPEC_HELP}")
    try:
        rand_augment_transform(spec, dict(translate_const=100, img_mean=_FILL))
    except (AssertionError, ValueError, KeyError):
        raise NoiseSpecError(f"bad timm RandAugment noise spec {spec!r}: {_SPEC_HELP}") from None


def _parse_tf_sections(spec: str, sections: Sequence[str]) -> NoiseSpec:
    values = dict(m=_TF_MAX_MAGNITUDE, n=_TF_DEFAULT_NUM_OPS)
    seen = set()
    for section in sections:
        match = re.fullmatch(r'([mn])(\d+)', section)
        if match is None or match.group(1) in seen:
            raise NoiseSpecError(f"bad section {section!r} in noise spec {spec!r}: {_SPEC_HELP}")
        seen.add(match.group(1))
        values[match.group(1)] = int(match.group(2))
    if values['m'] > _TF_MAX_MAGNITUDE or values['n'] < 1:
        raise NoiseSpecError(f"noise spec {spec!r} is out of range: {_SPEC_HELP}")
    return NoiseSpec(kind='tf', config=spec, magnitude=values['m'], num_ops=values['n'])


def is_small_image(image_size: Union[int, Sequence[int]], small_image_max: int = SMALL_IMAGE_MAX) -> bool:
    """True when the gentle small-image policy applies (shorter side <= small_image_max)."""
    return _shorter_side(image_size) <= small_image_max


def _shorter_side(image_size: Union[int, Sequence[int]]) -> int:
    # accepts 32, (32, 32) or timm's (3, 32, 32)
    if isinstance(image_size, int):
        return image_size
    return min(image_size[-2:])


def _policy(image_size, small_image_max: int) -> _Policy:
    return _SMALL_POLICY if is_small_image(image_size, small_image_max) else _FULL_POLICY


def cutout(img: Image.Image, size_pct: float, fillcolor=_FILL, **__) -> Image.Image:
    """Fill a square of side size_pct * shorter side with fillcolor, centered anywhere in the image.

    As in the official op, the center is uniform over the image, so the square may be clipped.
    """
    w, h = img.size
    half = int(size_pct * min(w, h) / 2)
    if half <= 0:
        return img
    cx, cy = random.randrange(w), random.randrange(h)
    box = (max(0, cx - half), max(0, cy - half), min(w, cx + half), min(h, cy + half))
    if len(img.getbands()) == 1 and isinstance(fillcolor, (tuple, list)):
        fillcolor = fillcolor[0]
    img = img.copy()
    img.paste(fillcolor, box)
    return img


def _posterize(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    # timm's posterize hands 0 bits to PIL, which (Pillow >= 13) refuses it; the official op
    # keeps 0 bits as a black image, and >= 8 bits as no change.
    if bits_to_keep >= 8:
        return img
    return img.point(_posterize_lut(max(int(bits_to_keep), 0), len(img.getbands())))


@functools.lru_cache(maxsize=None)
def _posterize_lut(bits_to_keep: int, bands: int) -> list:
    # built once per bit count: a fresh table an image was a third of the op's cost at 32 px
    mask = (0xFF << (8 - bits_to_keep)) & 0xFF
    return [v & mask for v in range(256)] * bands


def _randomly_negate(v: float) -> float:
    return -v if random.random() > 0.5 else v


def _translate_level_to_arg(level: float, policy: _Policy) -> Tuple[float]:
    pct = min(level / _TF_LEVEL_DENOM * policy.translate_pct, policy.translate_max)
    return _randomly_negate(pct),


def _cutout_level_to_arg(level: float, policy: _Policy) -> Tuple[float]:
    return min(level / _TF_LEVEL_DENOM * policy.cutout_pct, policy.cutout_max),


def _timm_level_fn(timm_name: str) -> Callable[[float], tuple]:
    level_fn = LEVEL_TO_ARG[timm_name]
    if level_fn is None:
        return lambda _: ()
    return lambda level: level_fn(level, {})


def _op_and_level_fn(name: str, policy: _Policy) -> Tuple[Callable, Callable[[float], tuple]]:
    if name == 'Cutout':
        return cutout, lambda level: _cutout_level_to_arg(level, policy)
    if name in ('TranslateX', 'TranslateY'):
        return NAME_TO_OP[name + 'Rel'], lambda level: _translate_level_to_arg(level, policy)
    if name == 'Posterize':
        return _posterize, _timm_level_fn(policy.posterize)
    # The rest match the official level scaling in timm already (both divide by 10).
    return NAME_TO_OP[name], _timm_level_fn(name)


class _TfOp:
    """One official-style RandAugment op: always applied (prob 1.0), fixed magnitude."""

    def __init__(self, name: str, magnitude: float, policy: _Policy, fill=_FILL, resample=_DEFAULT_RESAMPLE):
        self.name = name
        self.magnitude = min(float(magnitude), policy.max_magnitude)
        self.aug_fn, self.level_fn = _op_and_level_fn(name, policy)
        self.kwargs = dict(fillcolor=tuple(fill), resample=resample)

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.aug_fn(img, *self.level_fn(self.magnitude), **self.kwargs)

    def __repr__(self):
        return f'{self.__class__.__name__}(name={self.name}, m={self.magnitude})'


def tf_rand_augment_ops(
        magnitude: float,
        image_size: Union[int, Sequence[int]],
        fill=_FILL,
        interpolation: str = 'bilinear',
        small_image_max: int = SMALL_IMAGE_MAX,
) -> list:
    """The official-style ops for this image size, each a callable PIL -> PIL with a .name."""
    policy = _policy(image_size, small_image_max)
    resample = _resample(interpolation)
    return [_TfOp(name, magnitude, policy, fill=fill, resample=resample) for name in policy.ops]


def _resample(interpolation: str):
    # timm's ops pick one of a tuple per call, as its own RandAugment does for 'random'
    if interpolation == 'random':
        return Image.Resampling.BILINEAR, Image.Resampling.BICUBIC
    return str_to_pil_interp(interpolation)


def tf_rand_augment_transform(
        magnitude: float,
        num_ops: int,
        image_size: Union[int, Sequence[int]],
        fill=_FILL,
        interpolation: str = 'bilinear',
        small_image_max: int = SMALL_IMAGE_MAX,
) -> RandAugment:
    """Official-style RandAugment: num_ops ops drawn uniformly with replacement, all applied."""
    ops = tf_rand_augment_ops(magnitude, image_size, fill, interpolation, small_image_max)
    # timm's RandAugment draws with numpy, uniformly and with replacement, as the official code.
    return RandAugment(ops, num_layers=num_ops)


def noise_transform(
        spec: Optional[str],
        image_size: Union[int, Sequence[int]],
        fill=_FILL,
        interpolation: str = 'bilinear',
        small_image_max: int = SMALL_IMAGE_MAX,
) -> Optional[Callable[[Image.Image], Image.Image]]:
    """The PIL input-noise transform for a spec, or None when the spec means no noise.

    'tf-...' picks the small-image policy when the shorter side <= small_image_max.
    'rand-...' is timm's RandAugment exactly as timm's create_transform would build it.
    """
    parsed = parse_noise_spec(spec)
    if parsed is None:
        return None
    if parsed.kind == 'tf':
        return tf_rand_augment_transform(
            parsed.magnitude, parsed.num_ops, image_size, fill, interpolation, small_image_max)
    hparams = dict(translate_const=int(_shorter_side(image_size) * 0.45), img_mean=tuple(fill))
    if interpolation and interpolation != 'random':
        hparams['interpolation'] = str_to_pil_interp(interpolation)
    return rand_augment_transform(parsed.config, hparams)


def _train_defaults(data_config: dict, small_image_max: int) -> dict:
    # The official students see no color jitter: RandAugment (or nothing, for B0/B1) is the noise.
    defaults = dict(color_jitter=None)
    if is_small_image(data_config['input_size'], small_image_max):
        # The official 32 px pipeline only shifts by 4 px; ImageNet's 8%-area crops erase digits.
        defaults['scale'] = (0.5, 1.0)
    return defaults


def student_transform(
        data_config: dict,
        noise: Optional[str],
        fill=_FILL,
        small_image_max: int = SMALL_IMAGE_MAX,
        uint8: bool = False,
        **kwargs,
) -> transforms.Compose:
    """timm's training transform with the student's input noise between crop/flip and ToTensor.

    data_config is timm's resolve_data_config() output; kwargs go to timm's create_transform.
    ``uint8``: end in a uint8 CHW tensor (timm's prefetcher transform) and leave ToTensor's scaling
    and Normalize to the batch (``data.BatchNormalize``), which gives the same floats.
    """
    parsed = parse_noise_spec(noise)
    config = {**data_config, **_train_defaults(data_config, small_image_max), **kwargs}
    auto_augment = parsed.config if parsed is not None and parsed.kind == 'rand' else None
    primary, secondary, final = create_transform(
        **config, is_training=True, auto_augment=auto_augment, separate=True, use_prefetcher=uint8)
    noise_tfl = []
    if parsed is not None and parsed.kind == 'tf':
        noise_tfl = [tf_rand_augment_transform(
            parsed.magnitude,
            parsed.num_ops,
            config['input_size'],
            fill=fill,
            interpolation=config.get('interpolation') or 'bilinear',
            small_image_max=small_image_max,
        )]
    return transforms.Compose(primary.transforms + noise_tfl + secondary.transforms + final.transforms)


def teacher_transform(
        data_config: dict,
        small_image_max: int = SMALL_IMAGE_MAX,
        uint8: bool = False,
        **kwargs,
) -> transforms.Compose:
    """timm's training transform with crop/flip only: no RandAugment, no color jitter (``uint8``: as
    in ``student_transform``)."""
    config = {**data_config, **_train_defaults(data_config, small_image_max), **kwargs}
    return create_transform(**config, is_training=True, auto_augment=None, use_prefetcher=uint8)
