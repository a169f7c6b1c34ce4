"""Compatibility shim (one release): this module was split.

The recipe's ``calib:`` section (``CalibConfig`` and the algorithms' options) is
:mod:`megaquant.recipe_calib`; running the passes is :mod:`megaquant.calib.passes`; the helpers
the algorithms share are :mod:`megaquant.calib.capture`.
"""

from megaquant.calib.capture import (  # noqa: F401
    InputStats,
    all_gather_cat,
    all_reduce,
    as_gemm_input,
    capture_inputs,
    chunks,
    group_size,
    is_row_parallel,
    progress,
    quant_linears,
    warn,
    weight_amax,
)
from megaquant.calib.passes import apply_pins, prepare_algorithms, run_algorithm  # noqa: F401
from megaquant.recipe_calib import (  # noqa: F401
    ALGORITHMS,
    VALID_COMBINATIONS,
    CalibConfig,
    check_recipe_roles,
    get_algorithm,
)
