"""Compatibility shim (one release): the TE layer mixins are :mod:`megaquant.nn.te_mixins`."""

from megaquant.nn.te_mixins import (  # noqa: F401
    QuantTEGroupedLinearMixin,
    QuantTELayerNormLinearMixin,
    QuantTELinearMixin,
)
