"""Optimization-centric techniques side by side on real Fashion-MNIST, 3 seeds, same epochs.

SAM and its cheaper LookSAM-style variant against the baseline (accuracy, and the wall-clock ratio:
SAM should cost about 2x, the variant much less); EMA / SWA / LAWA weight averaging at a short budget
(accuracy of the averaged weights, next to the raw weights' from telemetry); a batch-size schedule
("increase the batch size instead of decaying the learning rate") against learning-rate decay
(accuracy, optimiser steps, wall-clock); LAMB and LARS (fastai's optimizers) at the same setting.

    python -m benchmarks.optim_centric [--quick] [--device cuda] [--recipes baseline sam]
"""

from __future__ import annotations

import argparse

from benchmarks.common import add_campaign_args, add_common_args, apply_threads, recipe_campaign

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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    add_campaign_args(p, task="fashion-mnist", epochs=8, n_samples=None, width=None)
    args = p.parse_args(argv)
    apply_threads(args)
    recipe_campaign("optim_centric", RECIPES, args,
                    quick={"task_kwargs": {"subset": 1024}, "epochs": 3, "seeds": [0], "width": 8})


if __name__ == "__main__":
    main()
