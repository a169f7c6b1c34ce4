"""Automatic mixed precision: choose each layer group's format under an effective-bits budget.

:mod:`bits` counts what a format costs per weight, :mod:`groups` finds the layers that must share
a format, :mod:`score` measures what each choice costs in accuracy, :mod:`knapsack` picks the
assignment, and :mod:`search` ties them together and writes the result as a recipe.
"""
