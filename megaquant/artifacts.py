"""Compatibility shim (one release): cached PyPI artifacts moved to :mod:`megaquant.demo.artifacts`.

This name is an alias of the new module (same object), so attribute reads and test patches
reach the real one.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("megaquant.demo.artifacts")
