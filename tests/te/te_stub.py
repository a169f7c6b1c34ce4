"""A stand-in ``transformer_engine`` package so that Megatron's TE classes import on CPU.

Only for subprocess tests (tests/te/test_te_layers_stub.py): it is installed on ``sys.meta_path``
and would make every later ``import transformer_engine`` in that process see the stub. Every
``transformer_engine.*`` module is a MagicMock, except the three layer base classes, which are
small real modules whose ``forward`` calls the TE-shaped double of one release exactly as that
release's layer does (te_doubles.FakeTELayer), through the module global the patch replaces.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from unittest.mock import MagicMock

import torch
from te_doubles import FakeTELayer, grouped_values, populate


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, root):
        self.root = root

    def find_spec(self, name, path, target=None):
        if name == "transformer_engine" or name.startswith("transformer_engine."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        obj = self.root
        for part in spec.name.split(".")[1:]:
            obj = getattr(obj, part)
        obj.__path__ = []
        obj.__name__ = spec.name
        return obj

    def exec_module(self, module):
        pass


_STATE: dict = {}


def switch(version: str) -> None:
    """Make the installed stub behave as TE ``version`` (its functions and calling protocol)."""
    te = _STATE["te"]
    te.__version__ = _STATE["version"] = version
    mods = te.pytorch.module  # a stale _linear_eager is harmless: FakeTELayer asks the fixture
    populate(mods.linear, version, "_Linear")
    populate(mods.layernorm_linear, version, "_LayerNormLinear")


def install(version: str) -> MagicMock:
    """Install the stub behaving as TE ``version``; returns the root mock."""
    te = _STATE["te"] = MagicMock(name="transformer_engine")
    mods = te.pytorch.module
    switch(version)

    class Linear(torch.nn.Module):
        _fn = "_Linear"
        _ns = mods.linear

        def __init__(self, in_features, out_features, *, bias=True, parallel_mode=None,
                     tp_size=1, return_bias=False, **kwargs):
            super().__init__()
            self.tp_size, self.tp_rank, self.tp_group = tp_size, 0, None
            self.parallel_mode, self.return_bias, self.use_bias = parallel_mode, return_bias, bias
            self.sequence_parallel = kwargs.get("sequence_parallel", False)
            self.eps = kwargs.get("eps", 1e-5)
            self.normalization = kwargs.get("normalization", "LayerNorm")
            self.zero_centered_gamma = kwargs.get("zero_centered_gamma", False)
            self.weight = torch.nn.Parameter(torch.randn(out_features, in_features) * 0.1)
            self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None
            self._init_extra(in_features)

        def _init_extra(self, in_features):
            pass

        def _values(self):
            return {"weight_tensor": self.weight}

        def forward(self, x, is_first_microbatch=None):
            out = FakeTELayer(_STATE["version"], self._fn, self._ns, self._values())(x)
            if self.use_bias and not self.return_bias:
                out = out + self.bias
            return (out, self.bias) if self.return_bias else out

    class LayerNormLinear(Linear):
        _fn = "_LayerNormLinear"
        _ns = mods.layernorm_linear

        def _init_extra(self, in_features):
            self.layer_norm_weight = torch.nn.Parameter(torch.rand(in_features) + 0.5)
            self.layer_norm_bias = torch.nn.Parameter(torch.randn(in_features) * 0.1)

        def _values(self):
            return {"weight_tensor": self.weight, "self.layer_norm_weight": self.layer_norm_weight,
                    "self.layer_norm_bias": self.layer_norm_bias}

    class GroupedLinear(torch.nn.Module):
        def __init__(self, num_gemms, in_features, out_features, *, bias=True, **kwargs):
            super().__init__()
            self.num_gemms, self.use_bias, self.tp_group = num_gemms, bias, None
            populate(mods.grouped_linear, _STATE["version"], "_GroupedLinear", num_gemms)
            for i in range(num_gemms):
                w = torch.nn.Parameter(torch.randn(out_features, in_features) * 0.1)
                setattr(self, f"weight{i}", w)

        def forward(self, x, m_splits, is_first_microbatch=None):
            weights = [getattr(self, f"weight{i}") for i in range(self.num_gemms)]
            values = grouped_values(_STATE["version"], weights, m_splits)
            return FakeTELayer(_STATE["version"], "_GroupedLinear", mods.grouped_linear, values)(x)

    class DotProductAttention(torch.nn.Module):
        """A real base class for Megatron's TEDotProductAttention (a MagicMock cannot be one);
        megaquant never patches TE's attention: it quantizes K/V in Megatron's forward."""

        def __init__(self, *args, **kwargs):
            super().__init__()

    te.pytorch.Linear, te.pytorch.LayerNormLinear = Linear, LayerNormLinear
    te.pytorch.DotProductAttention = DotProductAttention
    te.pytorch.GroupedLinear = GroupedLinear
    sys.meta_path.insert(0, _Finder(te))
    return te
