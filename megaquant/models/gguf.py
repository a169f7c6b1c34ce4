"""Compatibility shim (one release): the GGUF reader moved to :mod:`megaquant.demo.gguf`.

This name is an alias of the new module (same object), so attribute reads and test patches
reach the real one.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("megaquant.demo.gguf")
