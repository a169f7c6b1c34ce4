"""Protocol doubles of Megatron-Bridge's hook API, as its releases 0.3.0 .. 0.6.2 implement it.

A real Bridge cannot run here (it imports Transformer Engine and needs CUDA), so these doubles
copy the behaviour recorded in ``megaquant/integrations/bridge_contract.json``:

* ``ProviderDouble``: ``register_pre_wrap_hook(hook, prepend=False)`` keeps a list; the
  ``pre_wrap_hook`` property chains it as ``model = hook(model)`` with **no None check**;
  ``provide_distributed_model`` builds the chunks, runs the hooks, then wraps each chunk in
  Float16Module (Megatron's real one with ``bf16=True``) and (``wrap_with_ddp``) DDP,
  recording the events in that order;
* ``ModelConfigDouble``: Megatron's ``ModelConfig`` form, a plain ``pre_wrap_hooks`` list that the
  builder runs the same way.

``test_bridge_contract`` checks that the recorded event order equals the fixture's.
"""

from __future__ import annotations

from typing import Callable

from torch import nn


class Float16ModuleDouble(nn.Module):
    """Stands for Megatron's Float16Module without a dtype (Bridge wraps only under fp16/bf16;
    with ``bf16`` the doubles use Megatron's real Float16Module, which casts the chunk)."""

    def __init__(self, config, module: nn.Module):
        super().__init__()
        self.config, self.module = config, module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class DDPDouble(Float16ModuleDouble):
    """Stands for Megatron's DistributedDataParallel."""


def _run_hooks(build: Callable[[], list], hook, wrap_with_ddp: bool, events: list,
               bf16: bool = False) -> list:
    model = build()
    events.append("build")
    if hook is not None:
        model = hook(model)  # Bridge's provider: whatever the chain returned
        events.append("pre_wrap_hook")
    for chunk in model:  # Bridge sets TP attributes on every parameter here: a None fails
        for _ in chunk.parameters():
            pass
    model = [_float16(m) if bf16 else Float16ModuleDouble(None, m) for m in model]
    events.append("float16_module")
    if wrap_with_ddp:
        model = [DDPDouble(None, m) for m in model]
        events.append("ddp")
    return model


def _float16(chunk: nn.Module) -> nn.Module:
    """Megatron's own Float16Module (``module.bfloat16()`` on the whole chunk), as Bridge uses."""
    import dataclasses

    from megatron.core.transformer.module import Float16Module

    return Float16Module(dataclasses.replace(chunk.config, bf16=True), chunk)


class ProviderDouble:
    """``ModelProviderMixin``'s hook API; ``build()`` returns the list of chunks."""

    def __init__(self, build: Callable[[], list], bf16: bool = False):
        self.build, self.bf16 = build, bf16
        self.events: list[str] = []

    def register_pre_wrap_hook(self, hook, prepend: bool = False) -> None:
        if not hasattr(self, "_pre_wrap_hooks"):
            self._pre_wrap_hooks = []
        if prepend:
            self._pre_wrap_hooks.insert(0, hook)
        else:
            self._pre_wrap_hooks.append(hook)

    @property
    def pre_wrap_hook(self):
        if not getattr(self, "_pre_wrap_hooks", None):
            return None

        def composed_hook(model):
            for hook in self._pre_wrap_hooks:
                model = hook(model)  # no None check, as in Bridge
            return model

        return composed_hook

    def provide_distributed_model(self, ddp_config=None, wrap_with_ddp: bool = True, **_):
        if wrap_with_ddp and not ddp_config:
            raise ValueError("ddp_config is required when wrap_with_ddp is True")
        return _run_hooks(self.build, self.pre_wrap_hook, wrap_with_ddp, self.events, self.bf16)


class ModelConfigDouble:
    """Megatron's ``ModelConfig`` with a plain ``pre_wrap_hooks`` list (Bridge >= 0.4 setup)."""

    def __init__(self, build: Callable[[], list]):
        self.build = build
        self.pre_wrap_hooks: list = []
        self.events: list[str] = []

    def build_distributed_models(self, wrap_with_ddp: bool = True):
        def chain(model):
            for hook in self.pre_wrap_hooks:
                model = hook(model)
            return model

        return _run_hooks(self.build, chain if self.pre_wrap_hooks else None, wrap_with_ddp,
                          self.events)
