"""Deployable checkpoints: Hugging Face-style directories with real quantized weights.

    from megaquant.export import export_checkpoint, export_model
    report = export_checkpoint("outputs/ptq/nvfp4/checkpoint", "outputs/export/nvfp4")
    print(report.summary())

Layouts (``modelopt``: TensorRT-LLM / vLLM / SGLang via ``hf_quant_config.json``;
``compressed-tensors``: vLLM / SGLang), names and encodings: ``docs/export.md`` and
:mod:`megaquant.export.layouts`.
"""

from megaquant.export.export import ExportReport, export_checkpoint, export_model, read_report
from megaquant.export.layouts import LAYOUTS
from megaquant.export.schemes import SCHEMES

__all__ = ["ExportReport", "export_checkpoint", "export_model", "read_report", "LAYOUTS", "SCHEMES"]
