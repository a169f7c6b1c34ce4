"""Quantization-aware training (QAT) and distillation (QAD) for megaquant models.

``config`` (typed settings), ``schedule`` (learning rate), ``optim`` (optimizer and gradient
reduction under TP/DP), ``distill`` (vocab-parallel KL), ``step`` (one optimizer step),
``loop`` (the loop), ``state`` (train checkpoints: weights, quantizer and optimizer state, RNG).
The Hydra job is :mod:`megaquant.jobs.qat`; see docs/qat.md.
"""
