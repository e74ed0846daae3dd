"""Tail weight averaging (training.average_tail): the adapter saved is the mean of the trainable weights over
the schedule's last steps, not the last step's weights.

Why: at the CPU demo's size (~2,000-2,800 rows of a 135M model) a run's last iterate decides unseen prompts
near a boundary, and which side it lands on moves with the seed and with how many rows a machine trained
(recipes/calibration/README.md: 19 of 76 hand-written anchors flipped between two runs of one recipe). The
mean over the tail (Izmailov et al. 2018, SWA; Kaddour 2022, LAWA) sits in the middle of the region those
iterates explore. Only the trainable tensors are averaged (the LoRA matrices: ~13M numbers for the
slipstream recipe), in place of a copy per step.
"""
from __future__ import annotations

import math

from transformers import TrainerCallback


class TailAverage(TrainerCallback):
    """Running mean of the trainable parameters from step `start` on, written into the model when training
    stops (the last planned step, or an earlier stop such as the time budget's deadline), before the epoch's
    evaluation and the save, so the validation loss and the adapter are the averaged model's.

    Add it after any callback that stops training in on_step_end: it reads `control.should_training_stop`.
    A run resumed inside the tail averages from where it resumed (the running mean is not checkpointed).
    """

    def __init__(self, model, tail: float):
        if not 0 < tail < 1:
            raise ValueError(f"average_tail must be in (0, 1), got {tail}")
        self.model, self.tail = model, tail
        self.mean: dict | None = None
        self.count = 0
        self.start: int | None = None
        self.applied_at: int | None = None

    def on_train_begin(self, args, state, control, **kw):
        # The last `tail` of the planned steps; the step that starts it is the first one averaged.
        self.start = max(1, math.floor(state.max_steps * (1 - self.tail)) + 1)

    def _trainable(self):
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def on_step_end(self, args, state, control, **kw):
        import torch

        if self.applied_at is not None or state.global_step < self.start:
            return
        with torch.no_grad():
            self.count += 1
            if self.mean is None:
                self.mean = {n: p.detach().float().clone() for n, p in self._trainable()}
            else:
                for n, p in self._trainable():   # mean_k = mean_{k-1} + (w_k - mean_{k-1}) / k
                    self.mean[n].add_(p.detach().float() - self.mean[n], alpha=1 / self.count)
        if control.should_training_stop or state.global_step >= state.max_steps:
            self.apply(state.global_step)

    def apply(self, step: int) -> None:
        """Write the mean into the model (once); a single snapshot is the last step's own weights."""
        import torch

        if self.mean is None or self.applied_at is not None:
            return
        with torch.no_grad():
            for n, p in self._trainable():
                p.copy_(self.mean[n].to(p.dtype))
        self.applied_at = step
        print(f"[train] tail average: the adapter is the mean of the last {self.count} steps' weights "
              f"(steps {step - self.count + 1}-{step})", flush=True)

    def on_train_end(self, args, state, control, **kw):
        # A stop this callback did not see in on_step_end (none in the Trainer today): still save the mean.
        self.apply(state.global_step)

    def report(self) -> dict | None:
        if self.applied_at is None:
            return None
        return {"steps": self.count, "from_step": self.applied_at - self.count + 1, "to_step": self.applied_at}
