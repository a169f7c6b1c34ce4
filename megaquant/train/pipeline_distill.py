"""Distillation (QAD) under pipeline parallelism: the teacher's activations travel with the
student's.

The teacher is built with the student's stage split (``jobs/qat.py``), so pipeline rank ``r``
holds layers ``i..j`` of both. One micro-batch on one stage runs the teacher's layers (no
autograd) and the student's layers, and sends both outputs to the next stage in one tensor,
stacked along the batch dimension: ``[s, 2b, h]``, student first. The next stage splits it
again (:meth:`DistillPair.set_input_tensor`). The last stage has both logits for the
micro-batch and computes the distillation loss exactly as a single stage does
(``train.step.distill_loss``).

Why this design, and not a second pipeline pass for the teacher whose last-stage logits are
kept for the loss:

* **Memory.** A teacher pass ahead of the student's schedule would hold the teacher logits of
  every micro-batch of the step on the last stage (``k x b x s x V/tp`` floats: 1 GiB per
  micro-batch of 4096 tokens at a 128k vocabulary in bf16); stacked activations hold one
  micro-batch's teacher logits at a time, as the single-stage step does.
* **Schedule.** One 1F1B run per step instead of a forward-only run plus the 1F1B run (a second
  pipeline fill and drain).
* **No new Megatron hook.** The schedule sizes its p2p buffers from ``micro_batch_size``;
  stacking along the batch dimension only doubles it (``run_schedule(..., streams=2)``). Stacking
  along the hidden dimension (ModelOpt's choice, which allows a teacher of another width) would
  need the schedule's ``adjust_tensor_shapes_fn``; here the teacher has the student's
  architecture, so the batch dimension is the simpler choice.

Backward: the teacher's half is detached on arrival and produced without autograd, so the
gradient sent back to the previous stage is zero in the teacher's half and the student's half
is exactly the single-model gradient. Cost: twice the p2p volume of QAT.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megaquant.train.step import distill_loss


class DistillPair(nn.Module):
    """A student stage and its teacher stage, seen by Megatron's schedule as one model.

    The schedule reads ``config`` and ``model_type`` and calls ``set_input_tensor``; the
    forward step (:func:`distill_step`) calls the two models itself.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.config = student.config  # p2p shapes, dtype, and the schedule's settings
        self.model_type = student.model_type

    def set_input_tensor(self, input_tensor) -> None:
        """Split the received ``[s, 2b, h]`` activations (``None`` on the first stage)."""
        x = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
        if x is None:
            self.student.set_input_tensor(None)
            self.teacher.set_input_tensor(None)
            return
        b = x.shape[1] // 2
        self.student.set_input_tensor(x[:, :b].contiguous())
        self.teacher.set_input_tensor(x[:, b:].detach().contiguous())

    def train(self, mode: bool = True) -> "DistillPair":
        self.training = mode
        self.student.train(mode)
        self.teacher.eval()  # the teacher never trains (dropout off, as at one stage)
        return self


def distill_step(n_tokens: int, k: int, ctx, precision_ctx):
    """Megatron ``forward_step_func`` for a :class:`DistillPair` (``k`` micro-batches per rank).

    The loss contract is the single-stage one (``train/step.py``): a micro-batch's loss summed
    over tokens, divided by the global batch's tokens; times ``k`` because the schedule divides
    a ``(loss, record)`` loss by the number of micro-batches.
    """

    def step(pair: DistillPair, tokens: Tensor):
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        pos = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand_as(inputs)
        with precision_ctx(tokens.device):
            with torch.no_grad():
                teacher_out = pair.teacher(inputs, pos, None)
            student_out = pair.student(inputs, pos, None)

        def loss_func(logits: Tensor):
            loss = distill_loss(logits, teacher_out, labels, ctx.distill, ctx.tp_group) / n_tokens
            return loss * k, {"loss": loss.detach().double()}

        if pair.student.post_process:
            return student_out, loss_func
        return torch.cat([student_out, teacher_out.to(student_out.dtype)], dim=1), loss_func

    return step
