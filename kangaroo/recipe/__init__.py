"""Recipes: the curriculum's stages chained in order, each a ``kangaroo fit`` whose weights start
the next. ``spec`` reads a recipe file, ``runner`` runs it (state file, resume, data preparation),
``summary`` writes what it achieved."""

from kangaroo.recipe.nodes import NodeSetup
from kangaroo.recipe.runner import Preempted, run_recipe
from kangaroo.recipe.spec import Recipe, RecipeError, Stage, load_recipe, show_recipe

__all__ = ["NodeSetup", "Preempted", "Recipe", "RecipeError", "Stage", "load_recipe", "run_recipe", "show_recipe"]
