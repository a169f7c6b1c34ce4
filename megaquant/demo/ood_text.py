"""An out-of-domain evaluation text for QAT/QAD: the Python documentation's topic pages.

QAT trains on Shakespeare (the calibration plays); measuring it on Hamlet mixes recovery of
quantization error with adaptation to Shakespeare. This text is English technical prose (the
language reference and library topics ``help()`` shows, ~460 k characters, some code), from
``pydoc_data.topics`` in the standard library of the running interpreter: nothing is fetched,
nothing is installed, and it shares no domain with the training text.

It changes with the Python version (3.11.7 here), so the file name carries the version and
``benchmarks/qat_ood.py`` prints it next to the results.
"""

from __future__ import annotations

import platform
from pathlib import Path

from megaquant.demo.artifacts import cache_dir


def python_docs_text() -> Path:
    """The Python documentation topics as one UTF-8 file in the cache (written once)."""
    from pydoc_data.topics import topics

    from megaquant.util import write_text_atomic

    dest = cache_dir() / "data" / f"python_docs_topics-{platform.python_version()}.txt"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(dest, "\n\n".join(topics[k] for k in sorted(topics)))
    return dest
