"""`torch.compile` (and channels-last) as one fastai callback that reports what compiling costs and when it
pays, counts and explains recompilations, and resets the compile cache when the trainable set changes."""

from __future__ import annotations

import time
import warnings

import torch
import torch._dynamo
from torch import nn

from ..core.compile import StepTimer, break_even_step, compile_events, explain_recompile, median, new_guard_failures
from ..registry import register
from ._restore import RestoringCallback

__all__ = ["Compile"]


def _compile_counter() -> int:
    # Moves whenever dynamo or AOTAutograd compiles something (forward frames, lazily compiled backwards).
    from torch._dynamo.utils import counters

    return counters["frames"]["total"] + counters["aot_autograd"]["total"] + counters["stats"]["unique_graphs"]


def _trainable_signature(model: nn.Module) -> tuple:
    return tuple((id(p), p.requires_grad, tuple(p.shape)) for p in model.parameters())


class Compile(RestoringCallback):
    """`torch.compile` for the Learner's model, with the cost and the pay-off measured, and optional
    channels-last memory format (fastai's `ChannelsLast`, plus the inputs, undone after the fit).

    **What it does.** Runs the first `eager_steps` training steps of each fit eagerly (timed: the eager
    baseline), then compiles the model in place (`nn.Module.compile`: no wrapper, so `state_dict` keys,
    checkpoints and `export` are unchanged) and times every step. A step during which dynamo compiled is a
    compile step; its excess over the steady compiled step time is compile time, reported apart. From these
    it computes the **break-even step**: the step count after which the compiled run's cumulative time
    (compile + steps) falls below the eager run's. After the fit the model is uncompiled again.

    **Shapes.** `dynamic_batch=True` (default) marks the batch dimension of every input dynamic
    (`torch._dynamo.maybe_mark_dynamic`) before the first compile, so a partial last batch or a batch-size
    schedule reuses the same graph instead of recompiling. Other shape changes (progressive resizing,
    sequence-length warmup) recompile: with `dynamic=None` (PyTorch's default) dynamo compiles one static
    graph, then a dynamic one at the first change. Every recompilation is counted and explained (dynamo's
    failed guard, in words); when a frame reaches dynamo's `recompile_limit` (8), dynamo silently falls back
    to eager for new shapes: this callback warns. Alternatives: `drop_last=True`, a few fixed sizes.

    **Freezing and growth.** When the set of trainable parameters changes (requires_grad flipped by
    `LayerFreezing`, parameters added or reshaped by growth) the compile cache is reset
    (`torch._dynamo.reset()`, which is process-wide) and the model recompiles: dynamo could otherwise reuse a
    frame compiled for the other set (pytorch#139476: silently wrong gradients). Each reset is a telemetry event.

    **Defaults.** `backend="inductor"` (needs a C++ compiler on a CPU; first compile takes seconds to
    minutes); `mode=None`; `fullgraph=False`; `eager_steps=3`; `channels_last=False` (it pays on GPUs for
    fp16/bf16 convolutions, not reliably on CPUs). `backend="eager"`/`"aot_eager"` test the wiring cheaply.

    **What it saves.** Wall-clock per step when the compiled kernels are faster (fused elementwise ops, fewer
    launches: mostly on GPUs), minus the compile time, which a short fit may never recover: the break-even step
    says. Nothing in FLOPs or accuracy. Measured here (shared 2-core CPU, one thread, the 12-32-4 MLP of the
    tests, batch 32, 2 epochs of 8 steps): inductor took 73 s to compile the first training step and 2.6 s
    for the validation graph; compiled steps took 1.4 ms against 1.3 ms eager, so it never breaks even
    (`break_even_step=None`). Tiny CPU models are overhead-bound: compile pays on large models and GPUs.

    **Telemetry** (source `"compile"`): meta `backend`, `mode`, `dynamic_batch`, `channels_last`; stream
    `"step"` (per epoch: every training step's seconds and which compiled); stream `"compile"` (each
    compilation: step, train or validate, seconds, dynamo's guard failures and the explanation); stream
    `"reset"` (cache resets and why);
    per epoch the eager and compiled median step times, compile seconds, recompiles and the break-even step.
    """

    order = -4  # after LayerFreezing (-6) and FP8Training (-5): compile sees their changes in the same batch
    telemetry_name = "compile"

    def __init__(self, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = None,
                 fullgraph: bool = False, dynamic_batch: bool = True, channels_last: bool = False,
                 eager_steps: int = 3):
        if not isinstance(backend, str) or not backend:
            raise TypeError(f"backend must be a torch.compile backend name, e.g. 'inductor', got {backend!r}")
        if backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(f"unknown torch.compile backend {backend!r}; known: {torch._dynamo.list_backends()}")
        if mode is not None and mode not in ("default", "reduce-overhead", "max-autotune",
                                             "max-autotune-no-cudagraphs"):
            raise ValueError(f"mode must be None or a torch.compile mode, got {mode!r}")
        if dynamic is not None and not isinstance(dynamic, bool):
            raise TypeError(f"dynamic must be None, True or False, got {dynamic!r}")
        for name, value in (("fullgraph", fullgraph), ("dynamic_batch", dynamic_batch),
                            ("channels_last", channels_last)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if isinstance(eager_steps, bool) or not isinstance(eager_steps, int) or eager_steps < 0:
            raise TypeError(f"eager_steps must be an int >= 0, got {eager_steps!r}")
        self.backend, self.mode, self.dynamic, self.fullgraph = backend, mode, dynamic, fullgraph
        self.dynamic_batch, self.channels_last, self.eager_steps = dynamic_batch, channels_last, eager_steps
        self._model: nn.Module | None = None
        self._users_compiled_call = None
        self.recompiles = 0
        self.resets = 0

    # -- helpers
    def _compile(self):
        self._model.compile(backend=self.backend, mode=self.mode, dynamic=self.dynamic, fullgraph=self.fullgraph)
        self._compiled = True
        self._signature = _trainable_signature(self._model)

    def _prepare_inputs(self):
        xb = list(self.learn.xb)
        changed = False
        for i, x in enumerate(xb):
            if not torch.is_tensor(x):
                continue
            if self.channels_last and x.dim() == 4:
                xb[i], changed = x.contiguous(memory_format=torch.channels_last), True
            if self.dynamic_batch and self._compiled and x.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(xb[i], 0)
        if changed:
            self.learn.xb = tuple(xb)

    def _poll_compiles(self, where: str):
        count = _compile_counter()
        if count == self._count:
            return False
        self._count = count
        failures = new_guard_failures(self._failures_seen)
        for event in compile_events(self._since_us):
            self._since_us = max(self._since_us, 1 + int(time.time() * 1e6))
            if event["reason"]:
                self.recompiles += 1
                event["guard_failures"] = [event["reason"], *failures]
                event["why"] = explain_recompile(event["guard_failures"])
            attempt = event["compile_id"].rpartition("/")[2]
            if attempt.isdigit() and int(attempt) + 1 >= torch._dynamo.config.recompile_limit:
                warnings.warn(f"Compile: frame {event['compile_id']} reached torch._dynamo.config.recompile_limit "
                              f"({torch._dynamo.config.recompile_limit}); new shapes now run eagerly (last cause: "
                              f"{event['why']}). Fix the shapes (drop_last, fixed sizes) or raise the limit.",
                              stacklevel=2)
            self.telemetry.record(self.telemetry_name, "compile", epoch=self.learn.epoch, step=self._batch_step,
                                  where=where, **event)
        return True

    def reset_cache(self, why: str) -> None:
        """Drop every compiled graph (`torch._dynamo.reset()`, process-wide): the next step recompiles. Called
        when the trainable set changes; call it yourself after changing the model in a way guards miss."""
        torch._dynamo.reset()
        self.resets += 1
        self._signature = _trainable_signature(self._model)
        self.telemetry.record(self.telemetry_name, "reset", epoch=self.learn.epoch, step=self.learn.train_iter,
                              why=why)

    # -- events
    def before_fit(self):
        self.restore()
        self._model = self.learn.model
        self._users_compiled_call = getattr(self._model, "_compiled_call_impl", None)  # the user's own
        self._compiled = False
        self._signature = None
        self._eager_done = 0
        self._count = _compile_counter()
        self._since_us = int(time.time() * 1e6)
        self._failures_seen: dict = {}
        new_guard_failures(self._failures_seen)  # older ones are not this fit's
        self._timer = StepTimer(next(self._model.parameters()).device)
        self._eager_times: list[float] = []
        self._compiled_times: list[float] = []
        self._compile_s = 0.0
        self._batch_step = None
        if self.channels_last:
            self._model.to(memory_format=torch.channels_last)  # what fastai's ChannelsLast does
        self.telemetry.set_meta(self.telemetry_name, backend=self.backend, mode=self.mode,
                                dynamic_batch=self.dynamic_batch, channels_last=self.channels_last)

    def before_batch(self):
        if self.training and not hasattr(self.learn, "lr_finder"):
            if not self._compiled and self._eager_done >= self.eager_steps:
                self._compile()
            elif self._compiled:
                if _trainable_signature(self._model) != self._signature:
                    self.reset_cache("the set of trainable parameters changed")
            self._prepare_inputs()
            self._batch_step = self.learn.train_iter
            self._timer.start()
        else:
            self._prepare_inputs()

    def after_batch(self):
        if self.training and not hasattr(self.learn, "lr_finder"):
            compiled = self._compiled
            compiling = self._poll_compiles("train")
            self._timer.stop("eager" if not compiled else "compile" if compiling else "compiled")
            if not compiled:
                self._eager_done += 1
        elif self._compiled:
            self._poll_compiles("validate")

    def after_train(self):
        if hasattr(self.learn, "lr_finder"):
            return
        steps = self._timer.collect()
        self._eager_times += [s for s, tag in steps if tag == "eager"]
        self._compiled_times += [s for s, tag in steps if tag == "compiled"]
        # eager median without the very first step (allocator warm-up) when there are more
        eager = median(self._eager_times[1:] or self._eager_times)
        compiled = median(self._compiled_times)
        if compiled is not None:
            self._compile_s += sum(max(0.0, s - compiled) for s, tag in steps if tag == "compile")
        self.telemetry.record(self.telemetry_name, "step", epoch=self.learn.epoch,
                              seconds=[s for s, _ in steps], kind=[tag for _, tag in steps])
        breakeven = None
        if eager is not None and compiled is not None:
            breakeven = break_even_step(self._compile_s, eager, compiled)
        self.telemetry.record(self.telemetry_name, "epoch", epoch=self.learn.epoch, eager_step_s=eager,
                              compiled_step_s=compiled, compile_s=self._compile_s, recompiles=self.recompiles,
                              resets=self.resets, break_even_step=breakeven)

    def restore(self):
        model = self._model
        if model is None:
            return
        model._compiled_call_impl = self._users_compiled_call  # undoes nn.Module.compile (no public way)
        if self.channels_last:
            model.to(memory_format=torch.contiguous_format)
        self._model = None

    def state_dict(self) -> dict:
        return {"recompiles": self.recompiles, "resets": self.resets}

    def load_state_dict(self, state: dict) -> None:
        self.recompiles, self.resets = state["recompiles"], state["resets"]


def _compile_for_tests():
    return Compile(backend="eager", eager_steps=2)


register("compile", _compile_for_tests, "model")
