"""The ten ``tf_efficientnet_*_ns`` entrypoints, their Noisy Student recipes, and model loading.

timm keeps the Noisy Student weights as tags of the canonical architectures
(``tf_efficientnet_b0.ns_jft_in1k``) and maps the old ``*_ns`` names through a deprecation
shim that warns. Here the ``*_ns`` names become first-class entrypoints again: they build the
canonical timm architecture with timm's own ``ns_jft_in1k`` pretrained cfg, so weights come
from the same Hub repos and exports name the canonical architecture.
"""
import contextlib
import difflib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import timm
import torch
from safetensors import SafetensorError
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model

from .config import SMALL_DATA_LR_FEATURES, UserError
from .files import DiskFull, fsync_file, full_disk_errno, replace_dir

__all__ = [
    'NSRecipe', 'NS_RECIPES', 'ns_recipe', 'load_model', 'save_model', 'label_names_of',
    'data_config_of', 'count_params', 'architecture_of', 'final_feature_size', 'small_input_warning', 'predict',
    'open_image', 'load_weights', 'read_state_dict', 'is_model_dir', 'pickled_weights', 'crop_small_map_depthwise',
    'small_map_depthwise_pays', 'zero_new_head',
]

# pickled weight files: timm's local-dir loader reads the first three (torch.load(weights_only=True));
# `export --allow-pickle` converts any of them to model.safetensors
TIMM_PICKLES = ('pytorch_model.bin', 'pytorch_model.pth', 'model.pth')
PICKLE_FILES = TIMM_PICKLES + ('model.pt', 'model.bin', 'model.ckpt')


def is_model_dir(path: Path) -> bool:
    """A directory that ``load_model`` reads: a ``config.json`` and its weights beside it."""
    return path.is_dir() and (path / 'config.json').is_file()


def pickled_weights(path: Path) -> Optional[Path]:
    return next((path / name for name in PICKLE_FILES if (path / name).is_file()), None)


@dataclass(frozen=True)
class NSRecipe:
    """What the paper and the official scripts used for one variant.

    ``randaugment_magnitude`` of None means no RandAugment (the B0/B1 recipe).
    ``top1_baseline`` is the same architecture trained on ImageNet alone (None: not reported).
    """
    base: str
    tag: str
    top1_ns: Optional[float]
    top1_baseline: Optional[float]
    randaugment_magnitude: Optional[int]
    dropout: float
    drop_path: float
    unlabeled_ratio: int
    train_size: int
    test_size: int
    unlabeled_ratio_last: Optional[int] = None

    @property
    def randaugment(self) -> Optional[str]:
        """The TF-style RandAugment spec of the official scripts (2 ops, always applied)."""
        if self.randaugment_magnitude is None:
            return None
        return f'tf-m{self.randaugment_magnitude}-n2'

    def to_dict(self) -> Dict[str, Any]:
        return dict(asdict(self), randaugment=self.randaugment)


# Top-1 numbers: arXiv 1911.04252, Table 4 (B0-B7) and the official checkpoint table (L2).
# Noise and ratios: the official per-variant scripts. Stochastic depth is 0.2 at the last block.
NS_RECIPES: Dict[str, NSRecipe] = {
    'tf_efficientnet_b0_ns': NSRecipe('tf_efficientnet_b0', 'ns_jft_in1k', 78.8, 77.3, None, 0.2, 0.2, 1, 224, 224),
    'tf_efficientnet_b1_ns': NSRecipe('tf_efficientnet_b1', 'ns_jft_in1k', 81.5, 79.2, None, 0.2, 0.2, 3, 240, 240),
    'tf_efficientnet_b2_ns': NSRecipe('tf_efficientnet_b2', 'ns_jft_in1k', 82.4, 80.0, 6, 0.3, 0.2, 3, 260, 260),
    'tf_efficientnet_b3_ns': NSRecipe('tf_efficientnet_b3', 'ns_jft_in1k', 84.1, 81.7, 12, 0.3, 0.2, 3, 300, 300),
    'tf_efficientnet_b4_ns': NSRecipe('tf_efficientnet_b4', 'ns_jft_in1k', 85.3, 83.2, 15, 0.4, 0.2, 3, 380, 380),
    'tf_efficientnet_b5_ns': NSRecipe('tf_efficientnet_b5', 'ns_jft_in1k', 86.1, 84.0, 18, 0.4, 0.2, 3, 456, 456),
    'tf_efficientnet_b6_ns': NSRecipe('tf_efficientnet_b6', 'ns_jft_in1k', 86.4, 84.5, 24, 0.5, 0.2, 3, 528, 528),
    'tf_efficientnet_b7_ns': NSRecipe('tf_efficientnet_b7', 'ns_jft_in1k', 86.9, 85.0, 27, 0.5, 0.2, 3, 600, 600),
    'tf_efficientnet_l2_ns_475': NSRecipe(
        'tf_efficientnet_l2', 'ns_jft_in1k_475', 88.2, None, 27, 0.5, 0.2, 14, 475, 475, unlabeled_ratio_last=28),
    'tf_efficientnet_l2_ns': NSRecipe(
        'tf_efficientnet_l2', 'ns_jft_in1k', 88.4, None, 27, 0.5, 0.2, 14, 475, 800, unlabeled_ratio_last=28),
}


def _ns_cfg(recipe: NSRecipe) -> Dict[str, Any]:
    # timm's own cfg for the NS weights: same hf_hub_id, resolution, crop and normalization
    cfg = get_pretrained_cfg(f'{recipe.base}.{recipe.tag}').to_dict()
    cfg.pop('architecture', None)
    cfg.pop('tag', None)
    return cfg


# register_model reads the module's default_cfgs, so they must exist before the entrypoints
default_cfgs = generate_default_cfgs({name: _ns_cfg(r) for name, r in NS_RECIPES.items()})


def _register(fn):
    # timm registers these names as deprecated aliases and warns when they are overwritten;
    # replacing them is the point of this plugin, so silence exactly that warning.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            'ignore', message=f'Overwriting {fn.__name__} in registry', category=UserWarning)
        return register_model(fn)


def _create_ns(name: str, pretrained: bool, **kwargs) -> torch.nn.Module:
    recipe = NS_RECIPES[name]
    base_fn = timm.models.model_entrypoint(recipe.base)
    # Build the canonical architecture with the NS tag, so pretrained_cfg (and any export)
    # names e.g. tf_efficientnet_b0.ns_jft_in1k, exactly as timm does.
    pretrained_cfg = kwargs.pop('pretrained_cfg', None) or recipe.tag
    return base_fn(pretrained=pretrained, pretrained_cfg=pretrained_cfg, **kwargs)


@_register
def tf_efficientnet_b0_ns(pretrained=False, **kwargs) -> torch.nn.Module:
    """EfficientNet-B0 Noisy Student: 78.8% ImageNet top-1 (77.3% without NS)."""
    return _create_ns('tf_efficientnet_b0_ns', pretrained, **kwargs)


@_register
def tf_efficientnet_b1_ns(pretrained=False, **kwargs) -> torch.nn.Module:
    """EfficientNet-B1 Noisy Student: 81.5% ImageNet top-1 (79.2% without NS)."""
    return _create_ns('tf_efficientnet_b1_ns', pretrained, **kwargs)


@_register
def tf_efficientnet_b2_ns(pretrained=False, **kwargs) -> torch.nn.Module:
    """EfficientNet-B2 Noisy Student: 82.4% ImageNet top-1 (80.0% without NS)."""
    return _create_ns('tf_efficientnet_b2_ns', pretrained, **kwargs)


@_register
def tf_efficientnet_b3_ns(pretrained=False, **kwargs) -> torch.nn.Module:
    """EfficientNet-B3 Noisy Student: 84.1% ImageNet top-1 (81.7% without NS)."""
    return _create_ns('tf_efficientnet_b3_ns', pretrained, **kwargs)


@_register
def tf_efficientnet_b4_ns(pretrained=False, **kwargs) -> torch.nn.Module:
    """EfficientNet-B4 Noisy Student: 85.3% ImageNet top-1 (83.2% without NS)."""
    return _create_ns('tf_efficientnet_b4_ns', pretrained, **kwargs)


@_register
def tf_efficientnet_b5_ns(pretrained=False, **kwargs) -> torch.nn.Module:
    """EfficientNet-B5 Noisy Student: 86.1% ImageNet top-1 (84.0% without NS)."""
    return _create_ns('tf_efficientnet_b5_ns', pretrained, **kwargs)


@_register
def tf_efficientnet_b6_ns(pretrained=False, **kwargs) -> torch.nn.Module:
    """EfficientNet-B6 Noisy Student: 86.4% ImageNet top-1 (84.5% without NS)."""
    return _create_ns('tf_efficientnet_b6_ns', pretrained, **kwargs)


@_register
def tf_efficientnet_b7_ns(pretrained=False, **kwargs) -> torch.nn.Module:
    """EfficientNet-B7 Noisy Student: 86.9% ImageNet top-1 (85.0% without NS)."""
    return _create_ns('tf_efficientnet_b7_ns', pretrained, **kwargs)


@_register
def tf_efficientnet_l2_ns_475(pretrained=False, **kwargs) -> torch.nn.Module:
    """EfficientNet-L2 Noisy Student at 475 px: 88.2% ImageNet top-1."""
    return _create_ns('tf_efficientnet_l2_ns_475', pretrained, **kwargs)


@_register
def tf_efficientnet_l2_ns(pretrained=False, **kwargs) -> torch.nn.Module:
    """EfficientNet-L2 Noisy Student at 800 px: 88.4% ImageNet top-1."""
    return _create_ns('tf_efficientnet_l2_ns', pretrained, **kwargs)


def ns_recipe(model_name: str) -> Optional[NSRecipe]:
    """The NS recipe of a model name, ``tf_efficientnet_b3`` and ``tf_efficientnet_b3_ns`` alike.

    Returns None for architectures the paper did not train (their noise comes from the config).
    """
    name = model_name.split(':')[-1].split('/')[-1].split('.')[0]
    if name in NS_RECIPES:
        return NS_RECIPES[name]
    return NS_RECIPES.get(f'{name}_ns')


def architecture_of(spec: Union[str, os.PathLike]) -> Optional[str]:
    """The timm architecture a model spec builds (an NS variant counts as its base), or None if unknown.

    A local model directory (``local-dir:`` or a plain path) says it in its config.json; an ``hf-hub:``
    id is not looked up.
    """
    spec = os.fspath(spec)
    path = Path(spec[len('local-dir:'):] if spec.startswith('local-dir:') else spec).expanduser()
    if spec.startswith('local-dir:') and not is_model_dir(path):
        return None
    if is_model_dir(path):
        try:
            name = json.loads((path / 'config.json').read_text()).get('architecture')
        except (OSError, ValueError, AttributeError):
            return None
    else:
        name = os.fspath(spec)
    if not isinstance(name, str) or name.startswith('hf-hub:'):
        return None
    recipe = NS_RECIPES.get(name.split('.')[0])
    return recipe.base if recipe else name.split('.')[0]


def count_params(model_name: str, **kwargs) -> int:
    """Parameter count of a registered model (``kwargs`` to timm), built on the meta device so L2 costs nothing."""
    with torch.device('meta'):
        model = timm.create_model(model_name, **kwargs)
    return sum(p.numel() for p in model.parameters())


_LOOKALIKE = str.maketrans({'o': '0', 'l': '1', 'i': '1'})


def _suggest_models(name: str) -> str:
    # letters typed for the digits they look like (bO for b0) count as the digit
    def plain(text: str) -> str:
        return text.lower().translate(_LOOKALIKE)

    names = timm.list_models()
    by_plain: Dict[str, List[str]] = {}
    for n in names:
        by_plain.setdefault(plain(n), []).append(n)
    close = [n for p in difflib.get_close_matches(plain(name), list(by_plain), n=3, cutoff=0.6)
             for n in by_plain[p]][:3]
    return f" Did you mean: {', '.join(close)}?" if close else " See `timm.list_models()`."


def hub_endpoint() -> str:
    """The Hub's address as messages show it: without credentials embedded in HF_ENDPOINT."""
    from urllib.parse import urlsplit, urlunsplit

    from huggingface_hub import constants
    parts = urlsplit(constants.ENDPOINT)
    if parts.username is None and parts.password is None:
        return constants.ENDPOINT
    host = parts.hostname + (f':{parts.port}' if parts.port else '')
    return urlunsplit(parts._replace(netloc=host))


@contextlib.contextmanager
def _hub_download_errors(spec: str):
    """The Hub's errors while fetching a model's weights, as one line that names the repo and the fix."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    # huggingface_hub downloads into a temporary .incomplete file that it renames only once whole and
    # deletes when the download fails (within one run it resumes a cut download itself), so the
    # cache never holds a cut file and a rerun downloads it anew
    again = 'the cache keeps no part of it; run the same command again'
    try:
        yield
    except HFValidationError:
        raise UserError(f'{spec} is not a Hub model id; write it as hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION '
                        "(letters, digits, '-', '_' and '.', no '..').") from None
    except GatedRepoError:
        raise UserError(f'the weights of {spec} are gated on the Hub; accept the terms on its page and log in '
                        '(HF_TOKEN or `hf auth login`).') from None
    except RevisionNotFoundError:
        raise UserError(f'the repo of {spec} is on the Hub ({hub_endpoint()}) but that revision is not; check the '
                        'branch, tag or commit after the @.') from None
    except RepositoryNotFoundError:
        raise UserError(f'the weights of {spec} are not on the Hub ({hub_endpoint()}): repo not found; '
                        f'check the id, or log in for a private repo.') from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise UserError(f'the weights of {spec} are not in the local cache and HF_HUB_OFFLINE is set; unset '
                            'it to download them once, or point HF_HOME at a cache that holds them.') from None
        raise UserError(f'cannot download the weights of {spec}: the Hub ({hub_endpoint()}) cannot be reached '
                        'and they are not cached; check the network, or set HF_HUB_OFFLINE=1 with a cache that '
                        'holds them.') from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise UserError(f'the Hub ({hub_endpoint()}) refused the download of {spec} ({status}); check HF_TOKEN '
                            'or `hf auth login`, and that the token can read that repo.') from None
        if status == 404:
            raise UserError(f'the repo of {spec} lacks a file that timm loads (404); check that it holds '
                            'config.json and model.safetensors, as `noisystudent push` uploads them.') from None
        raise UserError(f'the download of {spec} failed: the Hub ({hub_endpoint()}) answered {status}; '
                        f'{again}.') from None
    except _download_transport_errors() as e:
        raise UserError(f'the download of {spec} failed: the connection to the Hub ({hub_endpoint()}) broke '
                        f'({type(e).__name__}); {again}.') from None


def _download_transport_errors() -> tuple:
    # huggingface_hub's HTTP client (httpx, or its httpx2 fork in newer releases) raises these
    import importlib

    for name in ('httpx2', 'httpx'):
        with contextlib.suppress(ImportError):
            return (importlib.import_module(name).TransportError,)
    return ()


def check_model_name(spec: str) -> None:
    """A timm name is one timm knows, and an ``hf-hub:`` id exists where the Hub can be asked; else one line.

    Directories are checked when they are loaded: a run's later stages make their own.
    """
    spec = os.fspath(spec)
    if spec.startswith('hf-hub:'):
        from huggingface_hub import constants, model_info
        repo, _, revision = spec[len('hf-hub:'):].partition('@')
        if constants.HF_HUB_OFFLINE:
            return  # the cache decides when it is loaded
        try:
            with _hub_download_errors(spec):
                model_info(repo, revision=revision or None)
        except UserError as e:
            if 'repo not found' not in str(e):
                raise
            raise UserError(f'model repo {repo!r}{"@" + revision if revision else ""} was not found on the Hub '
                            f'({hub_endpoint()}); check the id, or log in for a private repo.') from None
        except Exception:  # noqa: BLE001 - unreachable now; loading it later says why
            return
        return
    path = Path(spec[len('local-dir:'):] if spec.startswith('local-dir:') else spec).expanduser()
    if spec.startswith('local-dir:') or os.sep in spec or path.exists():
        return
    if not timm.is_model(spec):
        raise UserError(f'unknown model {spec!r}.' + _suggest_models(spec))


def check_safetensors(path: Path) -> None:
    """A safetensors file whose header reads (a cut or foreign file is one line, not a traceback)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework='pt') as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for a cut or foreign file
        raise UserError(f'{path} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__}); '
                        'it may be cut short: export or copy the model again.') from None


def _check_model_dir(path: Path) -> None:
    """A model directory's config.json parses and names a known architecture; its safetensors header reads."""
    try:
        config = json.loads((path / 'config.json').read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f'{path / "config.json"} is not valid JSON ({e}); export the model again.') from None
    arch = config.get('architecture') if isinstance(config, dict) else None
    if not isinstance(config, dict) or not isinstance(arch, str):
        raise UserError(f'{path / "config.json"} names no architecture; export the model again.')
    if not timm.is_model(arch):
        raise UserError(f'{path / "config.json"} names the architecture {arch!r}, which this timm '
                        f'({timm.__version__}) does not know.' + _suggest_models(arch))
    size = (config.get('pretrained_cfg') or {}).get('input_size') if isinstance(config.get('pretrained_cfg'), dict) \
        else None
    if size is not None and not (isinstance(size, list) and len(size) == 3
                                 and all(isinstance(v, int) and v > 0 for v in size)):
        raise UserError(f'{path / "config.json"} gives the input size {size!r}; it must be [3, H, W] with H and W '
                        'above 0: export the model again, or fix pretrained_cfg.input_size.')
    if (path / 'model.safetensors').is_file():
        check_safetensors(path / 'model.safetensors')


def _check_weights_file(path: Path, allow_pickle: bool = False) -> None:
    if (path / 'model.safetensors').is_file():
        return
    pickled = next((n for n in PICKLE_FILES if (path / n).exists()), None)
    if pickled in TIMM_PICKLES and allow_pickle:
        return
    if pickled:
        raise UserError(
            f'{path} holds only pickled weights ({pickled}); pickles are loaded only with --allow-pickle '
            '(tensors only, weights_only=True); `noisystudent export --allow-pickle` converts them to '
            'model.safetensors once.')
    raise UserError(f'{path} has config.json but no model.safetensors; export the model again.')


def _unfit(path: Path, e: BaseException) -> UserError:
    reason = ' '.join(str(e).split()) or type(e).__name__  # load_state_dict's lines, as one
    return UserError(f'the weights in {path} do not fit the architecture its config.json names '
                     f'({reason[:200]}); export the model again from its run.')


def check_weights_fit(path: Path) -> None:
    """The weights of the model directory ``path`` load into the model its config.json describes, as
    plain timm (``local-dir:``) loads them; the model is built on the meta device, so it costs no memory."""
    try:
        with warnings.catch_warnings(), torch.device('meta'):
            warnings.simplefilter('ignore')  # loading into meta parameters is a no-op, and says so per tensor
            timm.create_model(f'local-dir:{path}', pretrained=True)
    except (RuntimeError, AttributeError, KeyError, ValueError) as e:  # AttributeError: another architecture
        raise _unfit(path, e) from None


def load_model(
        spec: Union[str, os.PathLike],
        pretrained: bool = True,
        checkpoint: Optional[Union[str, os.PathLike]] = None,
        allow_pickle: bool = False,
        **kwargs,
) -> torch.nn.Module:
    """A model from a timm name, ``hf-hub:org/name[@rev]`` or a local exported directory.

    ``pretrained`` applies to timm names only: Hub ids and directories always load their weights.
    ``kwargs`` (``num_classes``, ``drop_rate``, ``drop_path_rate``, ``in_chans``, ...) pass to timm;
    a ``num_classes`` that differs from the saved head gives a new, freshly initialised head.
    ``checkpoint`` is a safetensors state dict loaded on top. Pickled weights (a directory's
    ``pytorch_model.bin``, a ``.pth`` checkpoint) are refused unless ``allow_pickle``, and even then
    only tensors are unpickled (``torch.load(weights_only=True)``).
    """
    spec = os.fspath(spec)
    path = Path(spec[len('local-dir:'):] if spec.startswith('local-dir:') else spec).expanduser()
    if spec.startswith('hf-hub:'):
        with _hub_download_errors(spec):
            model = timm.create_model(spec, pretrained=True, **kwargs)
    elif spec.startswith('local-dir:') or is_model_dir(path):
        if not is_model_dir(path):
            raise UserError(f'{path} is not a model directory (no config.json); pass a timm name, '
                            'hf-hub:org/name or a directory written by `noisystudent export`.')
        _check_weights_file(path, allow_pickle)
        _check_model_dir(path)
        try:
            model = timm.create_model(f'local-dir:{path}', pretrained=True, **kwargs)
        except RuntimeError as e:
            if (path / 'model.safetensors').is_file():  # missing, extra or mis-sized tensors
                raise _unfit(path, e) from None
            # timm's weights_only=True load refused a pickle holding more than tensors
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f'cannot load the pickled weights in {path} with weights_only=True: {reason}') from None
    elif os.sep in spec or path.exists():
        raise UserError(f'model directory {spec} does not exist or has no config.json.')
    else:
        if not timm.is_model(spec):
            raise UserError(f'unknown model {spec!r}.' + _suggest_models(spec))
        with _hub_download_errors(spec):
            model = timm.create_model(spec, pretrained=pretrained, **kwargs)
    if checkpoint is not None:
        load_weights(model, checkpoint, allow_pickle=allow_pickle)
    return model


def classifier_width(model: torch.nn.Module) -> int:
    """The width the classifier reads: timm's ``head_hidden_size`` where a head conv follows the pooling
    (lcnet, MobileNetV3: lcnet_050 pools 256 features and widens them to 1,280), else ``num_features``."""
    for name in ('head_hidden_size', 'num_features'):
        width = getattr(model, name, None)
        if isinstance(width, int) and width > 0:
            return width
    return SMALL_DATA_LR_FEATURES


def zero_new_head(model: torch.nn.Module, spec: Union[str, os.PathLike], pretrained: bool,
                  checkpoint: Optional[Union[str, os.PathLike]] = None) -> bool:
    """Zero the classifier when no weights were loaded into it; returns whether it did.

    A head is new when the model starts from scratch, or when its pretrained weights (timm's, a Hub
    id's, a directory's) come with another class count. timm's EfficientNet init draws a C-class head
    from U(+-1/sqrt(C)), so a 10-class head starts with logits of std 4-6 and a first loss near 6
    (ln 10 is 2.3); B0 then spends its first few hundred steps undoing it. A zero head starts every
    class at 1/C and the backbone learns from the second step (measured, docs/decisions.md).
    """
    if checkpoint is not None:
        return False
    spec = os.fspath(spec)
    from_source = pretrained or spec.startswith(('hf-hub:', 'local-dir:')) or is_model_dir(Path(spec).expanduser())
    if from_source and model.pretrained_cfg.get('num_classes') == getattr(model, 'num_classes', None):
        return False
    head = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if not isinstance(head, (torch.nn.Linear, torch.nn.Conv2d)):
        return False
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
    return True


def read_state_dict(path: Union[str, os.PathLike], allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a pickled checkpoint when ``allow_pickle``.

    A pickle is read with ``torch.load(weights_only=True)``: tensors and plain containers only,
    never arbitrary objects, so a hostile file cannot run code.
    """
    path = Path(path)
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device='cpu')
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise UserError(f'cannot read {path} as safetensors: {e}') from e
    if not allow_pickle:
        raise UserError(f'{path} is not a .safetensors file; pickled checkpoints are loaded only with '
                        '--allow-pickle (tensors only, torch.load(weights_only=True)).')
    try:
        state = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # UnpicklingError for anything beyond tensors; RuntimeError for non-torch files
        raise UserError(f'cannot load {path} with torch.load(weights_only=True): '
                        f'{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}') from None
    if isinstance(state, dict):
        # training checkpoints wrap the weights; like timm, prefer the EMA ones
        state = next((state[k] for k in ('state_dict_ema', 'model_ema', 'state_dict', 'model')
                      if isinstance(state.get(k), dict)), state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f'{path} does not hold a state dict of tensors.')
    return {k.removeprefix('module.'): v for k, v in state.items()}


def load_weights(model: torch.nn.Module, checkpoint: Union[str, os.PathLike], allow_pickle: bool = False) -> None:
    """Load a state dict into ``model`` (see ``read_state_dict``); shape mismatches name the keys."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / 'model.safetensors'
    if not checkpoint.is_file():
        raise UserError(f'checkpoint {checkpoint} does not exist.')
    state = read_state_dict(checkpoint, allow_pickle)
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        shown = ', '.join(f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in bad[:3])
        raise UserError(f'{checkpoint} does not fit the model: {len(bad)} keys differ in shape ({shown}).')
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        keys = (missing or unexpected)[:3]
        raise UserError(f'{checkpoint} does not fit the model: {len(missing)} missing and '
                        f'{len(unexpected)} unexpected keys (e.g. {", ".join(keys)}).')


def label_names_of(model: torch.nn.Module) -> List[str]:
    """Class names: the model's ``label_names``, ImageNet's for 1000 classes, else the indices."""
    names = getattr(model, 'pretrained_cfg', {}).get('label_names')
    num_classes = model.num_classes
    if names and len(names) == num_classes:
        return list(names.values()) if isinstance(names, dict) else list(names)
    if num_classes == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [str(i) for i in range(num_classes)]


def data_config_of(model: torch.nn.Module, image_size: Optional[int] = None) -> Dict[str, Any]:
    """timm's eval data config of a model, optionally at another square resolution."""
    args = {'input_size': (3, image_size, image_size)} if image_size else {}
    return timm.data.resolve_data_config(args, model=model)


def final_feature_size(model: torch.nn.Module, image_size: int) -> Optional[int]:
    """The side of the model's last feature map at ``image_size``, from timm's feature_info."""
    info = getattr(model, 'feature_info', None)
    try:
        reduction = int(info[-1]['reduction'])
    except (TypeError, IndexError, KeyError, ValueError):
        return None
    return max(1, image_size // reduction)


def small_input_warning(model: torch.nn.Module, name: str, image_size: int) -> Optional[str]:
    """A warning when ``image_size`` leaves the model a 1x1 last feature map; None when it does not."""
    side = final_feature_size(model, image_size)
    if side is None or side > 1:
        return None
    reduction = int(model.feature_info[-1]['reduction'])
    return (f'{name} downsamples {reduction}x, so {image_size} px inputs end in a 1x1 feature map and most of the '
            f'network sees no spatial detail; a larger image_size (at least {2 * reduction}) or a model with less '
            'downsampling usually trains better (see docs/how-it-works.md, "Small images").')


class _SmallMapDepthwise(torch.nn.Conv2d):
    """A stride-1 depthwise conv that, while training on a map smaller than its kernel's reach,
    convolves with only the taps that can meet a pixel. The output and every gradient are those of
    the full kernel: the outer taps only ever multiply the zero padding (their gradient stays 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            (kh, kw), (h, w) = self.kernel_size, x.shape[-2:]
            rh, rw = min(kh // 2, h - 1), min(kw // 2, w - 1)
            if (rh, rw) != (kh // 2, kw // 2):
                weight = self.weight[:, :, kh // 2 - rh:kh // 2 + rh + 1, kw // 2 - rw:kw // 2 + rw + 1]
                return torch.nn.functional.conv2d(x, weight, self.bias, 1, (rh, rw), 1, self.groups)
        return super().forward(x)


def _is_same_padded_depthwise(m: torch.nn.Module) -> bool:
    return (type(m) is torch.nn.Conv2d and 1 < m.groups == m.in_channels and m.stride == (1, 1)
            and m.dilation == (1, 1) and m.padding_mode == 'zeros' and all(k % 2 for k in m.kernel_size)
            and m.padding == tuple(k // 2 for k in m.kernel_size))


def crop_small_map_depthwise(model: torch.nn.Module) -> int:
    """Make the model's stride-1, same-padded depthwise convs train with only the kernel taps that a
    small map reaches (B0 at 32 px: its 5x5 convs on 1x1 and 2x2 maps); returns how many it changed.
    The parameters, the state dict and the exported model are unchanged, and so is evaluation."""
    convs = [m for m in model.modules() if _is_same_padded_depthwise(m)]
    for m in convs:
        m.__class__ = _SmallMapDepthwise
    return len(convs)


def small_map_depthwise_pays(device: torch.device) -> bool:
    """Where ``crop_small_map_depthwise`` is used: CPUs whose widest vector unit torch uses is AVX2.
    Measured on a 2-core AVX2-only AMD EPYC: oneDNN's backward of a 5x5 depthwise conv over a 1x1 map
    (1,152 channels, batch 64) took 68 ms against a 0.6 ms forward, and cropping the kernels took
    B0's bare forward+backward at 32 px from 118 to 182 img/s (``noisystudent bench``). On AVX-512 the
    full kernel is fast and is kept (the dev-task results were measured there), as it is on GPUs."""
    return device.type == 'cpu' and torch.backends.cpu.get_cpu_capability() == 'AVX2'


def save_model(
        model: torch.nn.Module,
        directory: Union[str, os.PathLike],
        label_names: Optional[Sequence[str]] = None,
        data_config: Optional[Dict[str, Any]] = None,
) -> Path:
    """Export ``model`` as ``model.safetensors`` + ``config.json`` that plain timm loads.

    The directory appears whole or not at all: it is written beside its final place and renamed.
    """
    from timm.models import save_for_hf

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f'.{directory.name}.tmp-{os.getpid()}'
    _remove_tree(tmp)
    model_config = {'label_names': list(label_names)} if label_names else None
    model = getattr(model, 'module', model)
    # safetensors stores contiguous tensors only; channels_last weights are converted in place
    model.to(memory_format=torch.contiguous_format)
    try:
        save_for_hf(model, tmp, model_config=model_config, safe_serialization=True, data_config=data_config)
        for f in tmp.iterdir():
            fsync_file(f)
        replace_dir(tmp, directory)
    except (OSError, RuntimeError, SafetensorError, UserError) as e:  # a full disk, as each writer reports it
        _remove_tree(tmp)
        code = e.code if isinstance(e, DiskFull) else full_disk_errno(e)
        if code is not None:
            need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            raise DiskFull(directory, code, need) from e
        if isinstance(e, UserError):
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f'cannot write the model to {directory} ({reason}); free space or fix permissions, '
                        'then run the same command again.') from e
    return directory


def _remove_tree(path: Path) -> None:
    import shutil
    if path.exists():
        shutil.rmtree(path)


def open_image(path: Union[str, os.PathLike]):
    """An RGB PIL image from a file; unreadable files are a UserError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert('RGB')
    except FileNotFoundError:
        raise UserError(f'image {path} does not exist.') from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f'cannot read image {path}: {e}') from None


@torch.inference_mode()
def predict(model: torch.nn.Module, images: Sequence[Union[str, os.PathLike]], top_k: int = 5) -> List[Dict[str, Any]]:
    """Top-k classes of each image with the model's own eval transform.

    Returns one ``{"image", "predictions": [{"index", "label", "probability"}]}`` per image.
    """
    transform = timm.data.create_transform(**data_config_of(model))
    names = label_names_of(model)
    model = model.eval().to(memory_format=torch.channels_last)
    batch = torch.stack([transform(open_image(p)) for p in images]).contiguous(memory_format=torch.channels_last)
    probs = model(batch).float().softmax(dim=-1)
    values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [
        {
            'image': os.fspath(path),
            'predictions': [
                {'index': int(i), 'label': names[int(i)], 'probability': float(v)} for v, i in zip(vs, ids)
            ],
        }
        for path, vs, ids in zip(images, values, indices)
    ]


def fold_batchnorm(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """``model`` in eval mode with each BatchNorm folded into the convolution just before it.

    For inference only (labeling): the same function with one op less per convolution, about 1.2x
    faster for EfficientNets on CPU. Which conv feeds which BatchNorm is read from the order of a
    module's children, which ``forward`` need not follow; so the folded model must give the same
    outputs as before on ``example``, or it is put back as it was. Works in place: fold a copy of
    a model that will be trained again.
    """
    from timm.layers import BatchNormAct2d, Conv2dSame
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    with torch.inference_mode():
        reference = model(example).float()
    undo = []
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            # exact types only: a subclass may transform its weight (weight standardization) in forward
            if type(conv) not in (torch.nn.Conv2d, Conv2dSame) \
                    or type(bn) not in (torch.nn.BatchNorm2d, BatchNormAct2d):
                continue
            if bn.running_mean is None or conv.out_channels != bn.num_features:
                continue
            with torch.no_grad():
                fused = fuse_conv_bn_eval(conv, bn)
            after = torch.nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else torch.nn.Identity()
            undo.append((parent, conv_name, conv, bn_name, bn))
            setattr(parent, conv_name, fused)
            setattr(parent, bn_name, after)
    if not undo:
        return model
    with torch.inference_mode():
        folded = model(example).float()
    tolerance = 1e-3 if example.dtype == torch.float32 else 2e-2
    if folded.shape == reference.shape and bool((folded - reference).abs().max() <= tolerance * reference.abs().max()):
        return model
    for parent, conv_name, conv, bn_name, bn in undo:
        setattr(parent, conv_name, conv)
        setattr(parent, bn_name, bn)
    return model
