"""The training loop: steps, a periodic log line, periodic evaluation and checkpoints.

Everything that differs between jobs (where checkpoints go, what evaluation means) comes in
as callables, so the loop is the same for the Hydra job, the tests and the benchmark.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from torch import nn

from megaquant.train.config import OptimConfig, TrainerConfig
from megaquant.train.schedule import lr_at
from megaquant.train.step import StepContext, train_step
from megaquant.util import is_rank0

log = logging.getLogger("megaquant.train")


def train(model: nn.Module, optimizer, ctx: StepContext, *, trainer: TrainerConfig,
          optim: OptimConfig, start_step: int = 0,
          save: Optional[Callable[[int], None]] = None,
          evaluate: Optional[Callable[[int], float]] = None,
          stop_after: Optional[int] = None) -> list[dict]:
    """Run steps ``start_step .. trainer.max_steps - 1``; return one record per step.

    ``save(step)`` is called every ``trainer.save_every_n_steps`` steps and after the last;
    ``evaluate(step)`` every ``trainer.val_check_interval`` steps. ``stop_after`` ends the
    run early after that many steps (the schedule still spans ``max_steps``): what a job that
    is interrupted looks like, used by the resume tests.
    """
    records: list[dict] = []
    end = trainer.max_steps if stop_after is None else min(trainer.max_steps,
                                                           start_step + stop_after)
    for step in range(start_step, end):
        t0 = time.perf_counter()
        rec = train_step(model, optimizer, step, lr_at(step, trainer.max_steps, optim), ctx)
        step_s = time.perf_counter() - t0
        rec.update(step=step + 1, step_s=step_s, tokens_per_s=rec["tokens"] / step_s)
        done = step + 1
        if evaluate is not None and trainer.val_check_interval and \
                done % trainer.val_check_interval == 0:
            rec["val_loss"] = evaluate(done)
        records.append(rec)
        if is_rank0() and trainer.log_every_n_steps and (done % trainer.log_every_n_steps == 0
                                                       or done == end):
            log.info(format_record(rec, trainer.max_steps))
        if save is not None and ((trainer.save_every_n_steps and
                                  done % trainer.save_every_n_steps == 0) or done == end):
            save(done)
    return records


def format_record(rec: dict, max_steps: int) -> str:
    """``step 3/20 | loss 2.8412 | lr 1.00e-05 | grad_norm 0.812 | 1530 tok/s``"""
    parts = [f"step {rec['step']}/{max_steps}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}",
             f"grad_norm {rec['grad_norm']:.3f}", f"{rec['tokens_per_s']:.0f} tok/s"]
    if "val_loss" in rec:
        parts.append(f"val_loss {rec['val_loss']:.4f}")
    return " | ".join(parts)
