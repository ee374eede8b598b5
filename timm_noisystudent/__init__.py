"""Noisy Student Training as a timm plugin.

Importing the package registers the ten ``tf_efficientnet_*_ns`` entrypoints with timm.
"""
from .config import UserError
from .models import NS_RECIPES, NSRecipe, load_model, ns_recipe, predict, save_model

__version__ = '0.1.0'

__all__ = ['NS_RECIPES', 'NSRecipe', 'UserError', 'load_model', 'ns_recipe', 'predict', 'save_model']
