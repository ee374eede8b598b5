"""Noisy Student Training as a timm plugin.

Importing the package registers the ten ``tf_efficientnet_*_ns`` entrypoints with timm. The
training API (``run``, ``demo``, ``train``, ``label``, ``evaluate_model``) is imported on first
use, so the plugin import stays as light as timm's own.
"""
from .config import RunConfig, UserError
from .models import NS_RECIPES, NSRecipe, load_model, ns_recipe, predict, save_model

__version__ = '0.1.0'

__all__ = [
    'NS_RECIPES', 'NSRecipe', 'RunConfig', 'UserError', 'load_model', 'ns_recipe', 'predict', 'save_model',
    'run', 'demo', 'train', 'label', 'evaluate_model',
]

_LAZY = {'run': 'pipeline', 'demo': 'demo', 'train': 'engine', 'evaluate_model': 'engine', 'label': 'labeling'}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f'.{_LAZY[name]}', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
