"""Optimization-centric techniques side by side on real Fashion-MNIST, 3 seeds, same epochs.

SAM and its cheaper LookSAM-style variant against the baseline (accuracy, and the wall-clock ratio:
SAM should cost about 2x, the variant much less); EMA / SWA / LAWA weight averaging at a short budget
(accuracy of the averaged weights, next to the raw weights' from telemetry); a batch-size schedule
("increase the batch size instead of decaying the learning rate") against learning-rate decay
(accuracy, optimiser steps, wall-clock); LAMB and LARS (fastai's optimizers) at the same setting.

    python -m benchmarks.optim_centric [--quick] [--device cuda] [--recipes baseline sam]
"""

from __future__ import annotations

from benchmarks.common import campaign_main

RECIPES = (
    "baseline",
    "sam",
    "looksam",  # the paper's alpha=0.7, tuned for batches of thousands
    "looksam(alpha=0.1)",
    "ema",
    "swa",
    "lawa",
    "batch_size_schedule(hold_lr=True)",  # the batch grows instead of the learning rate decaying
    "batch_size_schedule",  # the batch grows and the learning rate decays
    "lamb",
    "lars",
)


def main(argv=None):
    campaign_main("optim_centric", __doc__, RECIPES, argv=argv)


if __name__ == "__main__":
    main()
