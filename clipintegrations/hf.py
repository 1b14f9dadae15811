"""Hugging Face adapter: clip with a core clipper inside the transformers ``Trainer``.

Example::

    >>> from transformers import TrainingArguments
    >>> from clipintegrations import AutoClip
    >>> callback = AdaptiveGradientClippingCallback(AutoClip(percentile=10))
    >>> args = TrainingArguments("out", max_grad_norm=0)  # the Trainer's own clip would run first
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from clipintegrations.arguments import ClippingArguments
from clipintegrations.build import build_clipper
from clipintegrations.checks import check_bool
from clipintegrations.clipper import Clipper, ClipStats
from clipintegrations.norms import fsdp1_shard_group
from clipintegrations.runs import ClipHistory

try:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import CallbackHandler, ExportableState
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from transformers.utils import logging
except ImportError as error:  # pragma: no cover - transformers is installed wherever the tests run
    raise ImportError("clipintegrations.hf needs transformers: pip install 'clipintegrations[hf]'") from error

__all__ = ["AdaptiveGradientClippingCallback", "ClippingArguments"]

STATE_FILE = "clipintegrations_state.pt"
logger = logging.get_logger(__name__)


class AdaptiveGradientClippingCallback(TrainerCallback, ExportableState):
    """Clip gradients with ``clipper`` in ``on_pre_optimizer_step`` and log what it did.

    Runs once per optimizer step (after gradient accumulation) on unscaled gradients: under an
    fp16 ``GradScaler`` it unscales unless the Trainer already has, and an overflow step never
    enters the history (the scaler still skips it). Adds ``clip/norm``, ``clip/threshold`` (both
    of the last step) and ``clip/clip_rate`` (the fraction of steps, or for per-layer clipping of
    layers, clipped so far) to every training log, so they reach ``state.log_history`` and every
    ``report_to`` integration.

    Needs ``TrainingArguments(max_grad_norm=0)``: the Trainer's own clip (default 1.0) would run
    first. Supported: one process, DDP (``torchrun``, ``accelerate launch``), FSDP2 and FSDP1.
    Refused: DeepSpeed, whose engine owns the optimizer step.

    Checkpoints: the clipper's state goes to ``clipintegrations_state.pt`` in each checkpoint
    folder (the history would make ``trainer_state.json`` grow without bound), and resuming with
    ``resume_from_checkpoint`` restores it whether ``restore_callback_states_from_checkpoint`` is
    on or off.

    Args:
        clipper: the core clipper (``AutoClip``, ``PercentileClip``, ``ZClip``, ``FixedClip``), or
            its config as ``build_clipper`` takes it.
        log: add the statistics to the Trainer's logs (read from the device only when it logs).
        history: a ``ClipHistory`` that records every step, for a plot (not restored on resume).
    """

    def __init__(
        self, clipper: Clipper | dict[str, Any] | str, log: bool = True, history: ClipHistory | None = None
    ) -> None:
        if isinstance(clipper, (dict, str)):
            clipper = build_clipper(clipper)
        if not isinstance(clipper, Clipper):
            raise TypeError(
                "`clipper` must be a clipintegrations clipper (AutoClip, PercentileClip, ZClip, FixedClip) or its "
                f"config; got {type(clipper).__name__}"
            )
        self.clipper = clipper
        self.log = check_bool("log", log)
        self.history = history
        self.last_stats: ClipStats | None = None
        self.checkpoint: dict[str, Any] | None = None  # set by the Trainer when it restores callback states
        self._steps = 0
        self._clipped: torch.Tensor | float = 0.0
        self._logged_steps = 0
        self._process_group: Any = None
        self._output_dir = ""
        self._global_step = 0

    @classmethod
    def from_arguments(
        cls, arguments: ClippingArguments, history: ClipHistory | None = None
    ) -> AdaptiveGradientClippingCallback:
        """The callback that parsed ``ClippingArguments`` describe."""
        return cls(arguments.build_clipper(), log=arguments.clip_log, history=history)

    # -- checks and resume ------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if args.max_grad_norm and args.max_grad_norm > 0:
            raise ValueError(
                f"TrainingArguments(max_grad_norm={args.max_grad_norm}) clips every step with a fixed threshold "
                "before AdaptiveGradientClippingCallback runs (the Trainer's default is 1.0): set max_grad_norm=0 "
                "(--max_grad_norm 0 on the command line)"
            )
        if args.deepspeed or PartialState().distributed_type == DistributedType.DEEPSPEED:
            raise ValueError(
                "DeepSpeed owns the optimizer step (accelerate steps its engine inside backward), so "
                "AdaptiveGradientClippingCallback cannot clip before it: launch with DDP or FSDP instead, or use "
                "DeepSpeed's own `gradient_clipping`"
            )
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(model, FullyShardedDataParallel):
            self._process_group = fsdp1_shard_group(model, self.clipper.granularity)
        self._output_dir = args.output_dir
        if state.global_step > 0:
            self._restore(args, state)
        _move_to_front(self)

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        saved = _saved_checkpoint(state.stateful_callbacks.get(type(self).__name__), self.clipper)
        if saved is None or saved["steps"] == 0:
            logger.warning(
                "Resuming from a checkpoint without clipping state (saved before AdaptiveGradientClippingCallback "
                "was added): the clipper starts with an empty history"
            )
            return
        candidates = [
            args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None,
            saved.get("dir"),
            _checkpoint_folder(args.output_dir, state.global_step),
        ]
        for folder in filter(None, candidates):
            path = os.path.join(folder, saved["file"])
            if os.path.isfile(path):
                payload = torch.load(path, weights_only=True)
                if payload["steps"] == saved["steps"]:
                    self.clipper.load_state_dict(payload["clipper"])
                    self._steps = self._logged_steps = payload["steps"]
                    self._clipped = payload["clipped"]
                    return
        raise FileNotFoundError(
            f"the checkpoint at step {state.global_step} has clipping state from {saved['steps']} steps, but no "
            f"{saved['file']} with it in {[c for c in candidates if c]}: copy that file into the checkpoint folder, "
            "or set TrainingArguments(resume_from_checkpoint=<checkpoint folder>)"
        )

    # -- the step ---------------------------------------------------------------------------------
    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, optimizer=None, **kw
    ) -> None:
        _unscale_once(optimizer)
        stats = self.clipper.clip_(model, process_group=self._process_group)
        self.last_stats = stats
        self._clipped = self._clipped + stats.summary()[2]
        self._steps += 1
        if self.history is not None:
            self.history.record(stats)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self._global_step = state.global_step

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs
    ) -> None:
        if not self.log or logs is None or "loss" not in logs or self._steps == self._logged_steps:
            return
        self._logged_steps = self._steps
        norm, threshold, _ = self.last_stats.summary()
        values = torch.stack([norm, threshold, torch.as_tensor(self._clipped).to(norm) / self._steps])
        metrics = dict(zip(("clip/norm", "clip/threshold", "clip/clip_rate"), values.tolist()))
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    # -- checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What ``trainer_state.json`` keeps: the config and a pointer to the state file, never the history."""
        folder = _checkpoint_folder(self._output_dir, self._global_step)
        checkpoint = {"file": STATE_FILE, "dir": os.path.abspath(folder), "steps": self._steps}
        return {"args": {"clipper": self.clipper.config(), "log": self.log}, "attributes": {"checkpoint": checkpoint}}

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if not args.should_save:
            return
        folder = _checkpoint_folder(args.output_dir, state.global_step)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"no checkpoint folder {folder} to save the clipping state in")
        payload = {"steps": self._steps, "clipped": float(self._clipped), "clipper": self.clipper.state_dict()}
        torch.save(payload, os.path.join(folder, STATE_FILE))


def _checkpoint_folder(output_dir: str, step: int) -> str:
    """Where the Trainer saves the checkpoint of ``step`` (as ``Trainer._save_checkpoint`` names it)."""
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def _saved_checkpoint(saved: Any, clipper: Clipper) -> dict[str, Any] | None:
    """This callback's entry in ``trainer_state.json`` (one per instance when there are several)."""
    entries = saved if isinstance(saved, list) else [saved] if saved else []
    for entry in entries:
        if entry["args"]["clipper"] == clipper.config() or len(entries) == 1:
            return entry["attributes"]["checkpoint"]
    return None


def _unscale_once(optimizer: Any) -> None:
    """Unscale fp16 gradients unless the Trainer already has (``GradScaler.unscale_`` raises if called twice)."""
    scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer holds the scaler
    if scaler is None or not scaler.is_enabled():
        return
    inner = optimizer.optimizer
    from torch.amp.grad_scaler import OptState

    if scaler._per_optimizer_states[id(inner)]["stage"] is OptState.READY:
        scaler.unscale_(inner)


def _move_to_front(callback: TrainerCallback) -> None:
    """Run first in the Trainer's callback list, so that every integration's ``on_log`` sees the metrics.

    The Trainer puts the ``report_to`` integrations before user callbacks, and no hook hands a
    callback its handler; the handler is the ``self`` of the ``call_event`` frame that called us.
    Moving an element to the front during that loop neither skips nor repeats a callback.
    """
    frame = sys._getframe(1)
    while frame is not None:
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler) and callback in handler.callbacks:
            handler.callbacks.remove(callback)
            handler.callbacks.insert(0, callback)
            return
        frame = frame.f_back
    logger.warning(
        "AdaptiveGradientClippingCallback could not find its CallbackHandler: its metrics reach only the callbacks "
        "listed after it"
    )
