"""Which data a campaign trains on, and the settings each task starts from.

A task is a name of `effilab.datasets.TASKS` (`mnist1d`, `digits`, `fashion-mnist`, `mnist`, `cifar10`,
`pysource`: a character language model on the Python standard library's sources, for the techniques on
token sequences) or `folder:PATH`, an image folder with one subfolder per class
(`effilab.datasets.image_folder`). No torch import until a task is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["IMAGE_MODELS", "MODELS", "QUICK", "RESNET_STAGES", "TASK_DEFAULTS", "TASK_NAMES", "TaskError", "load_task",
           "model_needs_images", "parse_task", "task_defaults", "task_kwargs"]

# Per task: what a campaign uses when not told otherwise. MNIST-1D's setting is the main job's
# (3 recipes x 3 seeds: a few minutes on a 2-core CPU): 36 epochs, where the baseline has converged
# (its last 6 epochs within 0.4 points; at 12 it still gained 3.6 points in the last 6), so that
# InfoBatch is compared where its paper's claim is made. The image tasks are sized for a GPU or patience.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist1d": {"n_samples": 20_000, "epochs": 36, "bs": 128, "lr": 1e-2, "seeds": [0, 1, 2]},
    "digits": {"epochs": 20, "bs": 64, "lr": 1e-2, "seeds": [0, 1, 2]},
    "fashion-mnist": {"epochs": 8, "bs": 128, "lr": 1e-2, "seeds": [0, 1, 2]},
    "mnist": {"epochs": 8, "bs": 128, "lr": 1e-2, "seeds": [0, 1, 2]},
    "cifar10": {"epochs": 15, "bs": 128, "lr": 1e-2, "seeds": [0, 1, 2]},
    "pysource": {"epochs": 4, "bs": 32, "lr": 3e-3, "seeds": [0, 1, 2]},
    "folder": {"epochs": 10, "bs": 64, "lr": 1e-2, "seeds": [0, 1, 2]},
}
# `--quick`: a smoke test of the whole path (seconds of training), whatever the task.
QUICK: dict[str, Any] = {"n_samples": 2_000, "epochs": 4, "bs": 64, "lr": 1e-2, "seeds": [0]}
TASK_NAMES = ("mnist1d", "digits", "fashion-mnist", "mnist", "cifar10", "pysource")
# `small`: effilab.datasets.small_model (an MLP for flat inputs, a CNN for images, a transformer for token
# sequences); `mlp` flattens images; `cnn`: small_model's CNN (images only); `resnet`: a residual CNN (images only,
# see `RESNET_STAGES`) for the techniques that need residual blocks (stochastic depth, gates, Fixup, growth).
MODELS = ("small", "mlp", "cnn", "resnet")
# `resnet` is `effilab.datasets.resnet_small(task, width, RESNET_STAGES)`: four blocks at full resolution, deep
# enough for depth dropping, and one downsampling block; it is the model that growth's deepening reaches from
# its two-block (1, 1) start, so growth can be compared with training the grown model throughout.
RESNET_STAGES = (4, 1)
IMAGE_MODELS = ("cnn", "resnet")
# How many training samples `n_samples` means for each task.
_SIZE_ARG = {"mnist1d": "n_samples", "fashion-mnist": "subset", "mnist": "subset", "cifar10": "subset"}
# Loader arguments fixed per task: pysource reads 400 kB of source (about 5,600 training windows of 64
# characters; --quick: 60 kB), a size a 2-layer character transformer trains on in minutes on a CPU.
_FIXED = {"pysource": {"seq_len": 64, "max_bytes": 400_000}}
_FIXED_QUICK = {"pysource": {"seq_len": 64, "max_bytes": 60_000}}


class TaskError(ValueError):
    """An unknown task or an option that does not apply to it."""


def model_needs_images(model: str, task) -> str | None:
    """Why `model` cannot train on `task` (None: it can): `cnn` and `resnet` need images (C, H, W)."""
    shape = tuple(task.input_shape)
    if model not in IMAGE_MODELS or len(shape) == 3:
        return None
    fix = ("--model small (pysource's is a transformer of residual blocks)"
           if getattr(task, "kind", "") == "language_model" else "--model mlp or small, or an image task")
    return (f"model {model!r} needs image inputs (channels, height, width); task {task.name!r} has inputs of "
            f"shape {shape}: use {fix}")


def _valid() -> str:
    return f"valid tasks: {', '.join(TASK_NAMES)}, folder:PATH (an image folder, one subfolder per class)"


def parse_task(spec: str) -> tuple[str, str | None]:
    """`(name, path)`: `("mnist1d", None)`, `("folder", "/abs/path")`."""
    if not isinstance(spec, str) or not spec.strip():
        raise TaskError(f"unknown task {spec!r}; {_valid()}")
    text = spec.strip()
    if text.lower().startswith("folder:"):
        path = text[len("folder:"):].strip()
        if not path:
            raise TaskError(f"task {spec!r}: give the folder, e.g. folder:/data/my-images")
        return "folder", str(Path(path).expanduser().resolve())
    name = text.lower().replace("_", "-")
    if name not in TASK_NAMES:
        raise TaskError(f"unknown task {spec!r}; {_valid()}")
    return name, None


def task_defaults(name: str, quick: bool = False) -> dict[str, Any]:
    base = dict(TASK_DEFAULTS[name])
    if quick:
        base.update({k: v for k, v in QUICK.items() if k != "n_samples"})
        if name in _SIZE_ARG:
            base["n_samples"] = QUICK["n_samples"]
    return base


def task_kwargs(name: str, n_samples: int | None, quick: bool = False) -> dict[str, Any]:
    """The loader's keyword arguments for `n_samples` training samples (None: the task's default)."""
    arg = _SIZE_ARG.get(name)
    if arg is None:
        if n_samples is not None:
            raise TaskError(f"--n-samples does not apply to task {name!r} (it applies to "
                            f"{', '.join(_SIZE_ARG)})")
        return dict((_FIXED_QUICK if quick else _FIXED).get(name, {}))
    if n_samples is None:
        n_samples = task_defaults(name, quick).get("n_samples")
    if n_samples is None:
        return {}
    if isinstance(n_samples, bool) or not isinstance(n_samples, int):
        raise TaskError(f"--n-samples must be an integer, got {n_samples!r}")
    if n_samples < 1:
        raise TaskError(f"--n-samples must be positive, got {n_samples}")
    return {arg: int(n_samples)}


def load_task(spec: str, **kwargs):
    """The `TaskData` for a task spec; `DatasetUnavailable` says how to get data that is missing."""
    from ..datasets import TASKS, DatasetUnavailable, image_folder

    name, path = parse_task(spec)
    if name != "folder":
        try:
            return TASKS[name](**kwargs)
        except (ValueError, TypeError) as e:
            if isinstance(e, DatasetUnavailable):
                raise
            raise TaskError(f"task {name!r}: {e}") from None
    folder = Path(path)
    if not folder.is_dir():
        raise DatasetUnavailable(f"image folder {folder} not found: --task folder:PATH needs a folder with "
                                 "one subfolder of images per class")
    try:
        return image_folder(folder, **kwargs)
    except (FileNotFoundError, OSError) as e:
        raise DatasetUnavailable(f"image folder {folder}: {e} (--task folder:PATH needs one subfolder of "
                                 "images per class)") from None
