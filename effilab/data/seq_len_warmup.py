"""Sequence-length warmup as a fastai callback: short training sequences first, full length later."""

from __future__ import annotations

from ..core.batch_schedule import round_times
from ..core.curriculum import seq_len_at, truncate_batch
from ..registry import register
from .batch_schedule import BatchScheduleCallback

__all__ = ["SeqLenWarmup"]


class SeqLenWarmup(BatchScheduleCallback):
    """Sequence-length warmup: language-model training starts on short sequences that grow to full length.

    **What it does.** Each training batch of token sequences (x, y of shape (N, T), y the next tokens) is
    cut to its first `L` positions, a view on the device (no copy). `L` grows linearly with
    `learn.pct_train` from `start` tokens (or, for a float `start` < 1, that fraction of `T`) to the full
    `T` by `warmup_frac` of the fit, rounded down to a
    multiple of `multiple` (never below `start`), then stays `T`. Validation always sees full sequences.
    A schedule of `pct_train`: a shorter fit rescales it, and a resumed run replays it exactly.

    **Paper.** Li, Zhang & He, "The Stability-Efficiency Dilemma: Investigating Sequence Length Warmup
    for Training GPT Models", NeurIPS 2022 (arXiv 2108.06084): GPT-2/3 pre-training with a linear
    warmup from 8 tokens (truncation, as here) trained stably at larger batches and learning rates, and
    reached the baseline's quality with up to ~2x fewer tokens and ~4x less wall time.

    **Defaults.** `start=8` (the paper's), `warmup_frac=0.3` (the paper's warmup is a few % of a long
    pre-training run; a short fit needs a larger share), `multiple=8` (tensor-core friendly lengths).
    Tokens forwarded over the fit: about `1 - warmup_frac / 2` of the full count.

    **Use.** `Learner(dls, char_transformer(...), loss_func=CrossEntropyLossFlat(), cbs=SeqLenWarmup())`
    for a model that accepts any length up to its maximum (causal attention with positions per length).
    Batches whose x is (N, T) and whose y has the same T are cut; any other target is left alone.

    **Interactions.** Order -2: before `MixedPrecision` and any callback that reads the batch. Works with
    `num_workers>0`, a second `fit`, checkpoints and `export`. Inactive during `lr_find`. Sequence
    lengths that change per step make `torch.compile` recompile for each new length (one per multiple).

    **Telemetry.** Source `"schedule"`: meta `planned["seq_len"]` and stream `"step"` {`iter`, `pct`,
    `seq_len`} at each change. Source `"seq_len_warmup"`: meta `full` (T); stream `"epoch"` {`epoch`,
    `seq_len`, `tokens_forwarded`, `tokens_full`, `relative`, and the totals over all fits}.
    """

    telemetry_name = "seq_len_warmup"
    key, unit = "seq_len", "tokens"

    def __init__(self, start: int | float = 8, warmup_frac: float = 0.3, multiple: int = 8):
        if isinstance(start, bool) or not (isinstance(start, int) and start >= 1
                                           or isinstance(start, float) and 0.0 < start < 1.0):
            raise ValueError(f"start must be a positive int (the first sequence length, in tokens) or a float in "
                             f"(0, 1) (a fraction of the full length), got {start!r}")
        if not 0.0 < warmup_frac <= 1.0:
            raise ValueError(f"warmup_frac must be in (0, 1] (the part of the fit that warms up), got {warmup_frac}")
        if not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f"multiple must be a positive int (lengths are rounded to it), got {multiple!r}")
        super().__init__()
        self.start, self.warmup_frac, self.multiple = start, warmup_frac, multiple

    def full_size(self, xb, yb):
        x = xb[0]
        if x.dim() < 2:
            raise TypeError(f"SeqLenWarmup needs sequence batches (N, T, ...); got shape {tuple(x.shape)}")
        return int(x.shape[1])

    def size_at(self, pct, full):
        start = self.start if isinstance(self.start, int) else max(1, round_times(self.start, full))
        return seq_len_at(pct, full, start, self.warmup_frac, self.multiple)

    def units(self, size) -> int:
        return int(size)

    def reshape(self, xb, yb, size, full):
        def cut(t):
            return truncate_batch(t, size) if t.dim() >= 2 and t.shape[1] == full else t

        return tuple(cut(t) for t in xb), tuple(cut(t) for t in yb)


def _seq_len_warmup_for_tests():
    return SeqLenWarmup(start=8, warmup_frac=0.5, multiple=8)


register("seq_len_warmup", _seq_len_warmup_for_tests, "data", stateful=False, task="sequence",
         inputs=("sequence",))
