"""``callbacks=``: vroll's callables and transformers ``TrainerCallback``s, and the ``TrainerState`` they read.

A vroll callback is ``callback(trainer, metrics)``, called after every optimizer step. A
``transformers.TrainerCallback`` (an instance, or its class as ``Trainer`` also takes) gets the
events of ``transformers.Trainer`` that vroll's loop has: ``on_init_end``, ``on_train_begin``,
``on_step_begin``, ``on_step_end``, ``on_log`` (``logs=``: the step's metrics, vroll's names),
``on_save`` and ``on_train_end``, each with the trainer's config as ``args`` (vroll's, not a
``TrainingArguments``), a ``TrainerState``, a ``TrainerControl`` and ``model=``,
``processing_class=``, ``optimizer=``, ``lr_scheduler=``. ``control.should_training_stop`` ends
the run after that step (early stopping; the main process's decision, so every process stops
together); the other ``should_*`` flags are not read: vroll logs, saves and evaluates on its own
``logging_steps``, ``save_steps`` and ``eval_steps``.

The same ``TrainerState`` (``global_step``, ``max_steps``, ``epoch``, ``log_history``) is what
reward functions get as ``trainer_state``, as TRL passes its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from accelerate.utils import broadcast_object_list

# the trainer is typed Any here: base.py imports this module (a type import back would be a cycle)
OnlineTrainer = Any

EVENTS = ("on_init_end", "on_train_begin", "on_step_begin", "on_step_end", "on_log", "on_save", "on_train_end")


class Callbacks:
    """A trainer's callbacks, and the ``transformers.TrainerState`` / ``TrainerControl`` of its run."""

    def __init__(self, trainer: OnlineTrainer) -> None:
        from transformers import TrainerControl, TrainerState

        args = trainer.args
        # weak: a trainer that raised mid-run must still be freed at once, which closes its sync session
        # (a cycle would keep it to the next garbage collection, and the next trainer would get a 409)
        self._trainer = weakref.ref(trainer)
        self.plain: list[Callable[[OnlineTrainer, dict[str, float]], None]] = []
        self.hf: list[Any] = []  # transformers.TrainerCallback
        self.state = TrainerState(max_steps=trainer.total_steps, logging_steps=args.logging_steps,
                                  save_steps=args.save_steps, eval_steps=args.eval_steps or None,
                                  train_batch_size=args.per_device_train_batch_size,
                                  num_train_epochs=args.num_train_epochs,
                                  is_local_process_zero=trainer.accelerator.is_local_main_process,
                                  is_world_process_zero=trainer.is_main)
        self.control = TrainerControl()

    @property
    def trainer(self) -> OnlineTrainer:
        trainer = self._trainer()
        assert trainer is not None, "the trainer these callbacks belong to is gone"
        return trainer

    def add(self, callback: Any) -> None:
        """A vroll callable ``callback(trainer, metrics)``, or a ``TrainerCallback`` (instance or class)."""
        from transformers import TrainerCallback

        if isinstance(callback, type) and issubclass(callback, TrainerCallback):
            callback = callback()
        if isinstance(callback, TrainerCallback):
            self.hf.append(callback)
        elif callable(callback):
            self.plain.append(callback)
        else:
            raise TypeError(f"a callback is a callable callback(trainer, metrics) or a transformers TrainerCallback "
                            f"(see trainer.add_callback), got {type(callback).__name__}")

    def sync_state(self) -> None:
        """The state at the trainer's position: steps done, and epochs of prompts sampled (fractional)."""
        trainer = self.trainer
        sampler = trainer.rollouts.planner.sampler
        self.state.global_step = trainer.state.global_step
        self.state.epoch = sampler.epoch + sampler.index / max(1, sampler.num_rows)

    def current_state(self) -> Any:
        """The ``TrainerState`` reward functions get as ``trainer_state``, at the trainer's position."""
        self.sync_state()
        return self.state

    def event(self, name: str, **kwargs: Any) -> None:
        """Call ``name`` on every ``TrainerCallback`` (``Trainer``'s ``CallbackHandler.call_event``)."""
        if not self.hf:
            return
        self.sync_state()
        t = self.trainer
        model = t.accelerator.unwrap_model(t.model)  # Trainer's callbacks get the model, not its DDP wrapper
        for callback in self.hf:
            out = getattr(callback, name)(t.args, self.state, self.control, model=model, processing_class=t.tokenizer,
                                          optimizer=t.optimizer, lr_scheduler=t.scheduler, train_dataloader=None,
                                          eval_dataloader=None, **kwargs)
            if out is not None:  # a callback may return the control it changed
                self.control = out

    def after_step(self, metrics: dict[str, float], logged: bool) -> None:
        """Every callback after an optimizer step: vroll's first (what they add to ``metrics`` is logged too)."""
        for callback in self.plain:
            callback(self.trainer, metrics)
        self.event("on_step_end")
        if logged:
            self.state.log_history.append({**metrics, "epoch": self.state.epoch, "step": self.state.global_step})
            self.event("on_log", logs=metrics)

    def should_stop(self) -> bool:
        """Whether a ``TrainerCallback`` asked to stop; the main process decides for all (one broadcast a step)."""
        if not self.hf:
            return False
        box = [bool(self.control.should_training_stop)]
        if self.trainer.accelerator.num_processes > 1:
            broadcast_object_list(box, from_process=0)
        return box[0]
