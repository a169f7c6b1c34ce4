"""The recipe-side list of algorithms (recipe_calib) and the runners (calib.passes) agree."""

from megaquant.calib import passes
from megaquant.calib.algorithms import CalibConfig as ShimCalibConfig
from megaquant.recipe_calib import ALGORITHMS, CalibConfig


def test_calib_registry_every_algorithm_has_options_and_a_runner():
    runnable = {name for name, algo in ALGORITHMS.items() if algo is not None}
    assert runnable == set(passes.RUNNERS)
    assert ALGORITHMS["max"] is None and ShimCalibConfig is CalibConfig
