"""Data-centric techniques side by side: each against full data and against InfoBatch, 3 seeds.

Every recipe trains the same CNN (`effilab.datasets.small_model`) on real Fashion-MNIST with
`fit_one_cycle` at the same epochs and learning rate; per seed the recipes run back to back with the
same initial weights and data order. Reported per recipe (mean ± std over seeds): validation accuracy,
samples forwarded and backpropagated, optimiser steps, wall-clock and CPU time, peak memory — as
fractions of the baseline and, in a second table, of InfoBatch.

Published expectations to compare with: Selective Backprop up to 3.5x faster to a target error
(Jiang et al. 2019); progressive resizing a large cut in wall-clock at equal accuracy; importance
sampling often no better than uniform under a budget (Arazo et al. 2021). Sequence-length warmup has
its own benchmark (`benchmarks.seq_len_warmup`).

    python -m benchmarks.data_centric [--quick] [--device cuda] [--recipes baseline selective_backprop]
"""

from __future__ import annotations

from benchmarks.common import campaign_main

RECIPES = (
    "baseline",
    "infobatch",
    "random_prune",  # at InfoBatch's sample count
    "importance_sampling",
    "selective_backprop",
    "selective_backprop(stale=True)",
    "static_prune",
    "easy_to_hard",
    "progressive_resize",
    "mixup",
    "cutmix",
    "label_smoothing",
    "infobatch+progressive_resize",
)


def main(argv=None):
    campaign_main("data_centric", __doc__, RECIPES, ("baseline", "infobatch"), argv=argv)


if __name__ == "__main__":
    main()
