"""What every training process must agree on, so that several (accelerate launch / torchrun) stay in
step: whether a loss is finite, the planned horizon, when to stop, and a Ctrl-C acted on only at a
step boundary. With one process each is a no-op.
"""

from __future__ import annotations

import signal
import threading

import torch

REASONS = [None, "max_steps", "epochs", "max_minutes", "interrupted"]


def all_finite(accelerator, loss: torch.Tensor) -> bool:
    """Every process must agree, or one would skip a step the others take (and DDP would hang)."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.gather(finite)
    return bool(finite.min() > 0)


def clip_gradients(accelerator, params, grad_clip: float) -> torch.Tensor:
    """Clip the gradients to norm `grad_clip` (0: no clipping) and return their total norm before it.

    An optimizer step must not run when the norm is inf or NaN: clipping would turn every gradient
    into NaN, and AdamW would write NaN into the weights and its moment estimates, so every later loss
    is NaN too. Callers check the norm with all_finite and skip the step (as fp16 loss scaling does)."""
    return accelerator.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))


def agree(accelerator, value: int) -> int:
    """The main process's value, on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast

    return int(broadcast(torch.tensor([value], device=accelerator.device)).item())


def agree_stop(accelerator, reason: str | None) -> str | None:
    """Clocks differ between processes: the main process decides when a time budget is spent."""
    if accelerator.num_processes == 1:
        return reason
    return REASONS[agree(accelerator, REASONS.index(reason))]


class DeferredSigint:
    """Ctrl-C during the loop sets a flag that is acted on after a whole optimizer step.

    A KeyboardInterrupt raised between opt.step() and the step counter would save weights one update
    ahead of the step the checkpoint records, and under several processes each would stop at a
    different step; checked at the step boundary (and agreed between processes) neither can happen.
    A second Ctrl-C stops at once. Outside the main thread signals cannot be caught, and a process
    that ignores SIGINT keeps ignoring it: nothing changes then.
    """

    def __init__(self):
        self.hit = False
        self.previous = None
        # A process started with SIGINT ignored (nohup, a background job) keeps ignoring it.
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) not in (
            signal.SIG_IGN, None
        ):
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None
