"""megaquant.nn.te_layers / te_spec on Megatron's real TE classes over a stub TE, per protocol.

One fresh process (the stub TE must not leak into this one) runs tests/te/stub_scenarios.py for
one release per calling protocol: registration, the spec provider, a spec-built layer, a grouped
MoE layer and ``convert_model`` converting a built fused LayerNorm-linear + row-parallel block in
place, all compared with a ``fake_quantize`` reference. ~10-25 s on a 2-core CPU (mostly
importing Megatron).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


PROTOCOLS = ["1.13.0", "2.9.0", "2.12.0", "2.15.0", "2.16.1", "2.17.1", "2.20.2"]


@pytest.mark.timeout(180)
def test_te_layers_on_megatron_te_classes_over_a_stub_te():
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "stub_scenarios.py"), *PROTOCOLS],
                          env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for version in PROTOCOLS:
        assert proc.stdout.count(f"ok {version} ") == 6, proc.stdout
