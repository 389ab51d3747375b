"""One run: fit one recipe with one seed, and measure what it spent.

`fit_one(...)` builds the Learner for a recipe and a seed, trains it with `fit_one_cycle` and returns a
`Fit`: the per-epoch history, what the recipe chose, the telemetry, and a `Spend` -- what the run spent
(samples forwarded and backpropagated, optimiser steps, work, wall-clock and CPU time, peak memory),
computed in one place (`spend_of`) from the sample counter and the techniques' telemetry.

Stage 2 of the bench (recipes -> **run** -> stored result -> table/report): it reads recipes and tasks,
and knows nothing of how results are stored or shown.
"""

from __future__ import annotations

import contextlib
import gc
import random
import re
import resource
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException

from ..callback import EffilabCallback
from ..core.budget import StepFlops, warm_up_flop_counting
from .recipes import Recipe, RunContext, budget_plan
from .tasks import MODELS, RESNET_STAGES, TaskError, model_needs_images

__all__ = ["FORWARD_SHARE", "Fit", "SampleCounter", "Spend", "StopAtAccuracy", "check_device", "fit_one",
           "flops_of", "make_model", "num_threads", "spend_of"]

class SampleCounter(EffilabCallback):
    """Counts the training samples forwarded, the optimiser steps taken, the training FLOPs and the time
    spent training, whatever the recipe.

    FLOPs are forward+backward of the model on each training batch, counted by `FlopCounterMode` on the
    meta device (`effilab.core.budget.StepFlops`) once per batch shape and trainable-parameter pattern (so
    re-measured when a technique changes the inputs' size or freezes layers); None when the model cannot
    be counted there. Training time is the wall-clock of the training phases (validation excluded).
    Writes per-epoch counts to telemetry (source `"counter"`, stream `"epoch"`: forwarded, steps, flops and
    running totals). Host-side numbers only: batch sizes are shapes, so counting never syncs.
    """

    order = 100  # after the callbacks that may shorten or skip batches
    telemetry_name = "counter"

    def __init__(self, count_flops: bool = True):
        self.forwarded = self.steps = 0
        self.flops: int | None = 0 if count_flops else None
        self.train_s = 0.0
        self._epoch_forwarded = self._epoch_steps = self._epoch_flops = 0
        self._step_flops = StepFlops()
        self._batch_flops = 0
        self._cancelled = False
        self._t0 = None

    def before_train(self):
        self._epoch_forwarded = self._epoch_steps = self._epoch_flops = 0
        self._t0 = time.perf_counter()

    def before_batch(self):
        self._cancelled = False
        # Measured here, before the batch's forward, so that no measurement open around the step (a user's own
        # FlopCounterMode or saved-tensor hooks) sees the meta-device pass.
        if self.training and self.flops is not None:
            self._count_flops()

    def after_pred(self):
        if self.training:
            from fastai.torch_core import find_bs

            self._epoch_forwarded += find_bs(self.learn.xb)
            if self.flops is not None:
                self._epoch_flops += self._batch_flops

    def _count_flops(self):
        from fastai.torch_core import get_model

        self._batch_flops = self._step_flops(get_model(self.learn.model), self.learn.xb)
        if self._batch_flops is None:  # a model the meta device cannot run: FLOPs unknown for this run
            self.flops = None

    def after_cancel_step(self):
        self._cancelled = True  # e.g. gradient accumulation: fastai still fires after_step

    def after_step(self):
        if self.training and not self._cancelled:
            self._epoch_steps += 1

    def after_train(self):
        if not self.training or hasattr(self.learn, "lr_finder"):
            return
        if self._t0 is not None:
            self.train_s += time.perf_counter() - self._t0
        self.forwarded += self._epoch_forwarded
        self.steps += self._epoch_steps
        if self.flops is not None:
            self.flops += self._epoch_flops
        self.telemetry.record(self.telemetry_name, "epoch", epoch=self.learn.epoch,
                              forwarded=self._epoch_forwarded, steps=self._epoch_steps,
                              flops=None if self.flops is None else self._epoch_flops,
                              forwarded_total=self.forwarded, steps_total=self.steps, flops_total=self.flops)

    def state_dict(self) -> dict:
        return {"forwarded": self.forwarded, "steps": self.steps, "flops": self.flops, "train_s": self.train_s}

    def load_state_dict(self, state: dict) -> None:
        self.forwarded, self.steps = state["forwarded"], state["steps"]
        self.flops, self.train_s = state.get("flops", self.flops), state.get("train_s", 0.0)


class StopAtAccuracy(Callback):
    """Ends the fit after the first epoch whose validation accuracy reaches `target` (time-to-accuracy),
    noting when: the epoch, the host clock and the training samples forwarded so far (`counter`)."""

    order = 200  # after every callback's after_epoch (the Recorder's log, telemetry writers)

    def __init__(self, target: float, counter: SampleCounter | None = None, metric: str = "accuracy"):
        self.target, self.counter, self.metric = target, counter, metric
        self.reached: dict | None = None

    def before_fit(self):
        self.reached = None

    def after_epoch(self):
        if self.reached is not None or hasattr(self.learn, "lr_finder"):
            return
        rec = self.learn.recorder
        value = dict(zip(rec.metric_names[1:-1], rec.values[-1])).get(self.metric) if rec.values else None
        if value is not None and float(value) >= self.target:
            self.reached = {"epoch": self.learn.epoch, "clock": time.perf_counter(), "value": float(value),
                            "samples": self.counter.forwarded if self.counter is not None else None}
            raise CancelFitException


class _EpochHook(Callback):
    order = 190  # before StopAtAccuracy, which may end the fit in the same event

    def __init__(self, on_epoch: Callable[[int], None]):
        self.on_epoch = on_epoch

    def after_epoch(self):
        self.on_epoch(self.learn.epoch + 1)



# ------------------------------------------------------------------------------------ measurements


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: VmHWM) so the next reading covers one run only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        if m:
            return int(m.group(1)) / 1024
    except OSError:
        pass
    # Elsewhere only the process's lifetime peak is known (kB on Linux, bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _backpropagated(telemetry: Mapping) -> int | None:
    """Samples whose loss was backpropagated, as a technique reports them (any source, stream
    "samples": the last `backpropagated_total`, else the sum of `backpropagated`); None if none does.
    With several reporting sources, the smallest count (each one only removes samples)."""
    found = None
    for streams in telemetry.get("records", {}).values():
        recs = streams.get("samples", [])
        totals = [r["backpropagated_total"] for r in recs if "backpropagated_total" in r]
        parts = [r["backpropagated"] for r in recs if "backpropagated" in r]
        value = totals[-1] if totals else sum(parts) if parts else None
        if value is not None:
            found = int(value) if found is None else min(found, int(value))
    return found


def _forwarded(telemetry: Mapping) -> int | None:
    """Samples forwarded as techniques report them (stream "samples": the last `forwarded_total`), the
    largest over sources: a technique that forwards some samples twice or before the Learner's own
    forward (Selective Backprop's selection pass) counts what the Learner's counter cannot see."""
    totals = [recs[-1]["forwarded_total"] for streams in telemetry.get("records", {}).values()
              if (recs := [r for r in streams.get("samples", []) if "forwarded_total" in r])]
    return max(totals) if totals else None


def _cuda_peak_from_telemetry(telemetry: Mapping) -> float | None:
    # SystemMonitor resets CUDA's peak statistic at each epoch: its per-epoch peaks cover what ours lost.
    recs = telemetry.get("records", {}).get("system", {}).get("epoch", [])
    peaks = [r["cuda_peak_mb"] for r in recs if r.get("cuda_peak_mb") is not None]
    return max(peaks) if peaks else None


def _sum_over_ranks(n: int) -> int:
    import torch.distributed as dist

    from ..core.distributed import collective_device

    t = torch.tensor([n], dtype=torch.int64, device=collective_device())
    dist.all_reduce(t)
    return int(t.item())  # sync-ok: once, after the fit


@contextlib.contextmanager
def seeded(seed: int):
    """fastai's `set_seed(seed, reproducible=True)` for the duration of one run; the caller's random,
    numpy and torch generators and cuDNN flags are put back afterwards."""
    from fastai.torch_core import set_seed

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if cuda else None,
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    set_seed(seed, reproducible=True)
    try:
        yield
    finally:
        py, np_state, cpu, gpu, det, bench = states
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if gpu is not None:
            torch.cuda.set_rng_state_all(gpu)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = det, bench


@contextlib.contextmanager
def num_threads(n: int | None):
    """torch's CPU threads set to `n` for the duration (None: unchanged)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_model(task, model: str = "small", width: int | None = None) -> torch.nn.Module:
    """`small`: `effilab.datasets.small_model(task, width)`; `mlp`: its MLP on flattened inputs (images
    too); `cnn`: its CNN (image tasks only); `resnet`: `resnet_small(task, width or 16, RESNET_STAGES)` (image
    tasks only)."""
    from types import SimpleNamespace

    from ..datasets import resnet_small, small_model

    shape = tuple(task.input_shape)
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; models: {', '.join(MODELS)}")
    why = model_needs_images(model, task)
    if why is not None:
        raise TaskError(why)
    if model == "mlp":
        flat = SimpleNamespace(input_shape=(int(np.prod(shape)),), n_classes=task.n_classes)
        return small_model(flat, width)
    if model == "resnet":
        return resnet_small(task, width or 16, RESNET_STAGES)
    return small_model(task, width)


def check_device(spec) -> torch.device:
    """The torch device for `spec` (None: cuda if available, else cpu), checked before any training: an
    unknown name, or a GPU this machine does not have, is a `ValueError` that says what exists."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(spec, (str, torch.device)) or isinstance(spec, bool):
        raise ValueError(f"device must be a string such as 'cpu' or 'cuda', got {spec!r}")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {spec!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device {spec!r}: no CUDA GPU is available on this machine; use --device cpu")
        if device.index is not None and device.index >= n:
            raise ValueError(f"device {spec!r}: this machine has {n} CUDA GPU(s) (cuda:0 .. cuda:{n - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {spec!r}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {spec!r}: the bench runs on cpu, cuda or mps")
    return device


# ------------------------------------------------------------------------------------------ what a run spent

# Work counts forward+backward passes in samples at full size. A forward pass alone (Selective Backprop's
# selection pass, static pruning's scoring pass) counts a third: backward costs about twice the forward
# (2N vs 4N FLOPs per sample and parameter, Kaplan et al. 2020).
FORWARD_SHARE = 1 / 3


@dataclass
class Spend:
    """What one run spent, in every unit the bench compares.

    `samples`: training samples forwarded (the Learner's forward, or more where a technique forwards
    some before it: Selective Backprop's selection pass); `backpropagated`: those whose loss reached the
    gradient; `full_samples`: what full data forwards in the planned epochs; `steps`: optimiser steps;
    `work`: forward+backward passes in samples at full size (see `work_of`); `flops`: training FLOPs
    (see `flops_of`; None where the model cannot be counted); `wall_s`/`cpu_s`: the fit's wall-clock and
    the process's CPU time; `train_s`: the wall-clock of its training phases (validation excluded: a time
    budget's measure); `peak_mem_mb`: the run's peak memory, the peak mark
    being reset before the run (`peak_mem_scope` "run"; "process" where it cannot be reset: the
    process's peak so far) -- CUDA's allocator on a GPU, the resident set (RSS) on a CPU.
    """

    samples: int
    backpropagated: int
    full_samples: int
    steps: int
    work: float
    wall_s: float
    cpu_s: float
    peak_mem_mb: float | None
    peak_mem_kind: str = "rss"
    peak_mem_scope: str = "run"
    flops: float | None = None
    train_s: float | None = None

    @property
    def throughput(self) -> float | None:
        """Training samples forwarded per second of wall-clock."""
        return self.samples / self.wall_s if self.wall_s > 0 else None

    def to_dict(self) -> dict:
        return asdict(self)


def _size_fraction(telemetry: Mapping) -> float:
    """The share of the full-size input forwarded, as techniques that shrink inputs report it (any source,
    stream "epoch": `<unit>_forwarded_total` over `<unit>_full_total`, e.g. pixels for progressive
    resizing, tokens for sequence-length warmup); 1.0 when none does."""
    frac = 1.0
    for streams in telemetry.get("records", {}).values():
        recs = streams.get("epoch", [])
        last = recs[-1] if recs else {}
        for key, value in last.items():
            if key.endswith("_forwarded_total"):
                full = last.get(key[: -len("_forwarded_total")] + "_full_total")
                if full:
                    frac *= value / full
    return frac


def _extra_passes(telemetry: Mapping) -> int:
    """Samples given an extra forward+backward pass (SAM's and LookSAM's second pass: stream "epoch",
    `extra_samples`), summed over every source and epoch."""
    return sum(int(r.get("extra_samples") or 0) for streams in telemetry.get("records", {}).values()
               for r in streams.get("epoch", []))


def _forward_only(telemetry: Mapping) -> int:
    """Samples given a forward pass without backward besides the Learner's training forwards, as techniques
    report them (`forward_only_samples`, in any record of any source, or in a source's meta for a one-off
    pass): Selective Backprop's selection pass, static pruning's scoring pass, the BatchNorm passes of SWA
    and schedule-free, LSUV's initialisation forwards."""
    key = "forward_only_samples"
    records = sum(int(r.get(key) or 0) for streams in telemetry.get("records", {}).values()
                  for recs in streams.values() for r in recs)
    return records + sum(int(m.get(key) or 0) for m in telemetry.get("meta", {}).values())


def work_of(learner_samples: int, telemetry: Mapping) -> float:
    """Samples-equivalent forward+backward passes at full size: the Learner's training forwards (each
    backpropagated), plus the techniques' forward-only passes (counted `FORWARD_SHARE`), plus the extra
    forward+backward passes of SAM, all scaled by the share of pixels or tokens forwarded."""
    passes = learner_samples + FORWARD_SHARE * _forward_only(telemetry) + _extra_passes(telemetry)
    return passes * _size_fraction(telemetry)


def _technique_flops(telemetry: Mapping) -> float:
    """Training FLOPs that techniques report the counter cannot see (stream "epoch", summed over every source
    and epoch): `flops_added` (computed outside the step the counter counts: layer freezing filling its cache
    with the frozen prefix's outputs) less `flops_skipped` (not computed inside it: stochastic depth's dropped
    blocks; the counter counts the whole model once per batch shape, what changes from step to step at random
    the technique reports)."""
    return sum(float(r.get("flops_added") or 0) - float(r.get("flops_skipped") or 0)
               for streams in telemetry.get("records", {}).values() for r in streams.get("epoch", []))


def flops_of(learner_flops: float | None, learner_samples: int, telemetry: Mapping) -> float | None:
    """Training FLOPs: those counted on the Learner's training batches (at their real size), plus a
    technique's forward-only pass (`FORWARD_SHARE`) and extra forward+backward passes (SAM's) as their
    telemetry reports them, each at the run's mean FLOPs per forwarded sample, with the FLOPs techniques report
    outside the counted step (`flops_added`, `flops_skipped`: see `_technique_flops`). None: not counted."""
    if learner_flops is None or not learner_samples:
        return None
    per_sample = learner_flops / learner_samples
    forward_only = _forwarded(telemetry) or 0
    if forward_only <= learner_samples:
        forward_only = 0
    extra = per_sample * (FORWARD_SHARE * forward_only + _extra_passes(telemetry))
    return float(max(learner_flops + extra + _technique_flops(telemetry), 0.0))


def spend_of(counter: SampleCounter, telemetry: Mapping, full_samples: int, wall_s: float, cpu_s: float,
             peak_mem_mb: float | None, peak_mem_kind: str, peak_mem_scope: str) -> Spend:
    """A run's `Spend` from its sample counter and its techniques' telemetry (the one place it is
    computed; a budget reads the same counts)."""
    forwarded = max(counter.forwarded, _forwarded(telemetry) or 0)
    backpropagated = _backpropagated(telemetry)
    return Spend(samples=forwarded, backpropagated=forwarded if backpropagated is None else backpropagated,
                 full_samples=full_samples, steps=counter.steps, work=work_of(counter.forwarded, telemetry),
                 wall_s=wall_s, cpu_s=cpu_s, peak_mem_mb=peak_mem_mb, peak_mem_kind=peak_mem_kind,
                 peak_mem_scope=peak_mem_scope, flops=flops_of(counter.flops, counter.forwarded, telemetry),
                 train_s=counter.train_s)


# ------------------------------------------------------------------------------------------ one run


@dataclass
class Fit:
    """One finished fit: accuracy per epoch (`history`), what the recipe chose (`params`), the telemetry,
    what it spent, and when it reached the target accuracy (None: not asked, or never)."""

    history: list[dict]
    params: dict
    telemetry: dict
    spend: Spend
    time_to_target_s: float | None = None
    samples_to_target: int | None = None
    epoch_to_target: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.history[-1]["accuracy"]

    @property
    def best_accuracy(self) -> float:
        return max(h["accuracy"] for h in self.history)


def fit_one(task, recipe: Recipe, ctx: RunContext, device: torch.device, model: str = "small",
            width: int | None = None, target_acc: float | None = None,
            on_epoch: Callable[[int], None] | None = None, distributed: bool = False) -> Fit:
    """Fit `make_model(task, model, width)` on `task` under `recipe` with `fit_one_cycle(ctx.epochs,
    ctx.lr)`, seeded with `ctx.seed`, and measure it. A fit that forwarded no training sample raises.

    `distributed`: inside `effilab.system.distrib_ctx` (one process of a `torchrun` launch): the samples
    counted are all ranks' (summed at the end), the times and memory this rank's.

    A recipe with a budget (`recipes.budget_plan`: under `--budget`, `reinvest`, a budget-matched
    baseline) trains under `effilab.budget.Budget` instead: one-cycle over the budget's progress, within
    the plan's epoch bound, ending when the budget is spent. `NothingToMatch` before any training for a
    matched baseline whose technique saved nothing."""
    from fastai.callback.progress import ProgressCallback
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (adds Learner.fit_one_cycle)
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy

    from ..callback import telemetry_of

    plan = budget_plan(recipe, ctx)
    gc.collect()  # the previous run's Learner sits in reference cycles: free it before measuring this one
    with seeded(ctx.seed):
        dls = task.dataloaders(bs=ctx.bs, seed=ctx.seed, device=device)
        if len(dls.train) == 0:
            raise TaskError(f"the training set ({len(task.train)} samples) is smaller than one batch "
                            f"(bs={ctx.bs}): no sample would be forwarded")
        net = make_model(task, model, width)
        counter = SampleCounter()
        extra: list[Callback] = [] if on_epoch is None else [_EpochHook(on_epoch)]
        stopper = StopAtAccuracy(target_acc, counter) if target_acc is not None else None
        if stopper is not None:
            extra.append(stopper)
        budget = None
        if plan is not None:
            from ..budget.clock import Budget

            budget = Budget(plan.amount, plan.clock_unit)
            extra.append(budget)
        learn = Learner(dls, net, loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                        cbs=[counter, *recipe.make_callbacks(ctx), *extra])
        learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, ProgressCallback)])
        full_epoch = len(dls.train) * ctx.bs if dls.train.drop_last else dls.train.n
        scope = "run" if _reset_peak_rss() else "process"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if counter.flops is not None:
            warm_up_flop_counting()  # once per process, untimed: else the campaign's first run carries it
        start, cpu_start = time.perf_counter(), time.process_time()
        if distributed:
            from ..system.distributed import distrib_ctx
        with learn.no_logging(), distrib_ctx(learn) if distributed else contextlib.nullcontext():
            learn.fit_one_cycle(ctx.epochs if plan is None else plan.epochs, ctx.lr)
            if distributed:  # each rank forwarded its shard; the techniques' telemetry counts whole plans
                counter.forwarded = _sum_over_ranks(counter.forwarded)
                if counter.flops is not None:  # with what this rank's techniques report, which `flops_of`
                    own = round(_technique_flops(telemetry_of(learn).to_dict()))  # then adds to the sum once
                    counter.flops = _sum_over_ranks(counter.flops + own) - own
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    names = list(learn.recorder.metric_names[1:-1])  # drop "epoch" and "time"
    history = [{"epoch": i, **dict(zip(names, map(float, vals)))}
               for i, vals in enumerate(learn.recorder.values)]
    if not history:
        raise RuntimeError("the fit ended before its first epoch did")
    tel = telemetry_of(learn).to_dict()
    peak_mem, kind = _peak_rss_mb(), "rss"
    if device.type == "cuda":
        peaks = [torch.cuda.max_memory_allocated(device) / 2**20, _cuda_peak_from_telemetry(tel)]
        peak_mem, kind, scope = max(p for p in peaks if p is not None), "cuda", "run"
    spend = spend_of(counter, tel, full_epoch * ctx.epochs, wall, cpu, peak_mem, kind, scope)
    if spend.samples == 0:
        raise RuntimeError("the fit forwarded no training sample (is the training set smaller than a batch?)")
    reached = stopper.reached if stopper is not None else None
    params = dict(ctx.notes)
    if plan is not None:
        params["budget"] = plan.to_dict() | {"spent": budget.spent, "progress": budget.progress,
                                             "stopped_by_budget": budget.stopped_by_budget}
    return Fit(history=history, params=params, telemetry=tel, spend=spend,
               time_to_target_s=None if reached is None else reached["clock"] - start,
               samples_to_target=None if reached is None else reached["samples"],
               epoch_to_target=None if reached is None else reached["epoch"])
