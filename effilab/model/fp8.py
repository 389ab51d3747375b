"""FP8 training through torchao's `convert_to_float8_training`, on GPUs that have FP8 tensor cores."""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from ..registry import register
from ._restore import RestoringCallback

__all__ = ["FP8Training", "fp8_device_support", "fp8_layer_filter"]

# torchao's auto-filter thresholds (float8_linear_utils.py, measured on H100): below them the casts and
# amax reductions cost more than the faster GEMM saves. (N, K) = (out_features, in_features).
_RECIPES = ("tensorwise", "rowwise")


def fp8_layer_filter(module: nn.Module, fqn: str = "", recipe: str = "tensorwise",
                     size_filter: bool = True) -> tuple[bool, str]:
    """(convert, why) for one module: only `nn.Linear` whose dimensions are multiples of 16 (the FP8
    GEMM's requirement) and, with `size_filter`, large enough to pay for the casts (torchao's H100 table)."""
    if recipe not in _RECIPES:
        raise ValueError(f"recipe must be one of {_RECIPES}, got {recipe!r}")
    if not isinstance(module, nn.Linear):
        return False, "not an nn.Linear"
    n, k = module.weight.shape
    if n % 16 or k % 16:
        return False, f"in/out features {k}x{n} are not multiples of 16"
    if size_filter:
        if recipe == "tensorwise" and k <= 4096 and n <= 1024:
            return False, f"too small to pay ({k}x{n}: tensorwise needs in>4096 or out>1024)"
        if recipe == "rowwise" and (n <= 2048 or k <= 1024 or (n <= 4096 and k <= 2048)):
            return False, f"too small to pay ({k}x{n}: rowwise needs out>2048, in>1024, not both <=4096/2048)"
    return True, "converted"


def fp8_device_support(device: torch.device) -> tuple[bool, str]:
    """Whether `device` has FP8 tensor cores (CUDA compute capability >= 8.9: Ada, Hopper, Blackwell; or
    AMD MI300), and why not."""
    if device.type != "cuda":
        return False, (f"the model is on {device.type!r}: FP8 training needs a GPU with FP8 tensor cores (CUDA "
                       "compute capability >= 8.9, e.g. L4, H100; or AMD MI300)")
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip is not None:
        arch = getattr(props, "gcnArchName", "")
        if arch.startswith("gfx94") or arch.startswith("gfx95"):
            return True, f"{props.name} ({arch})"
        return False, f"{props.name} ({arch}) has no FP8 tensor cores (needs MI300, gfx94x, or newer)"
    cap = (props.major, props.minor)
    if cap < (8, 9):
        return False, (f"{props.name} has compute capability {cap[0]}.{cap[1]}; FP8 tensor cores need >= 8.9 "
                       "(Ada, Hopper, Blackwell)")
    return True, f"{props.name} (compute capability {cap[0]}.{cap[1]})"


class FP8Training(RestoringCallback):
    """FP8 training: the large Linear layers compute their three GEMMs (output, input gradient, weight
    gradient) in float8 with dynamic scaling, through torchao's `convert_to_float8_training`.

    **What it does.** At the start of the fit, swaps each `nn.Linear` that passes `fp8_layer_filter`
    (dimensions multiples of 16; with `size_filter`, large enough to pay, torchao's H100 thresholds) for
    torchao's `Float8Linear`, which shares the same weight and bias Parameters (the optimiser, checkpoints and
    `state_dict` keys are unchanged). After the fit (or an interrupted one) the original `nn.Linear` modules
    go back, holding the trained weights: save, export and inference see a plain model. Weights, master
    copies and the optimiser stay in fp32 (or your autocast dtype).

    **Paper.** Micikevicius et al., "FP8 Formats for Deep Learning", arXiv 2209.05433 (E4M3 for the
    forward, E5M2's range for gradients); torchao float8 training (PyTorch blog: +25% tokens/s for Llama3-8B
    on 8xH100 tensorwise, with `torch.compile`).

    **Where it runs.** Only on GPUs with FP8 tensor cores (CUDA compute capability >= 8.9, or AMD MI300).
    Elsewhere `before_fit` refuses, before any batch, saying why. `emulate=True` runs torchao's emulation
    (FP8 casts, then an fp32 matmul) on any device, CPU included: FP8 numerics without any speed-up, for
    teaching and tests. `effilab.core.precision.fp8_grid` and `fp8_scaling_error` show the number grid and
    the scaling error on a CPU.

    **Defaults.** `recipe="tensorwise"` (torchao's fastest); `size_filter=True`. Pair it with `Compile`:
    without `torch.compile` the casts run as separate kernels and FP8 is slower than bf16 (torchao #2262:
    1.42x slower on H100 without compile).

    **What it saves.** Wall-clock on large GEMMs (hidden sizes in the thousands) on FP8 GPUs, with compile;
    nothing on small layers (they are filtered out: a 2-layer 32-wide MLP ran 9.8 s in FP8 vs 7.1 s in fp16,
    torchao #572), nothing on a CPU (emulation is slower than fp32). Memory: little (weights stay high
    precision). Not measured here (no GPU on this machine).

    **Telemetry** (source `"fp8"`): meta `device`, `emulate`, `recipe`, `converted` (layer names) and
    `skipped` (layer name -> reason).
    """

    order = -5  # before Compile (order -4): compile traces the converted layers
    telemetry_name = "fp8"

    def __init__(self, recipe: str = "tensorwise", size_filter: bool = True, emulate: bool = False,
                 require_layers: bool = True):
        if recipe not in _RECIPES:
            raise ValueError(f"recipe must be one of {_RECIPES}, got {recipe!r}")
        for name, value in (("size_filter", size_filter), ("emulate", emulate), ("require_layers", require_layers)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        self.recipe, self.size_filter, self.emulate, self.require_layers = recipe, size_filter, emulate, require_layers
        self._originals: dict[str, nn.Linear] = {}

    def plan(self, model: nn.Module) -> tuple[list[str], dict[str, str]]:
        """Which Linear layers of `model` would convert, and why the others would not."""
        converted, skipped = [], {}
        for fqn, module in model.named_modules():
            if isinstance(module, nn.Linear):
                ok, why = fp8_layer_filter(module, fqn, self.recipe, self.size_filter)
                if ok and not fqn:  # torchao would return a new module instead of converting in place
                    ok, why = False, "the model itself is one Linear: wrap it in nn.Sequential"
                (converted.append(fqn) if ok else skipped.__setitem__(fqn, why))
        return converted, skipped

    def before_fit(self):
        self.restore()
        model = self.learn.model
        device = next(model.parameters()).device
        if not self.emulate:
            ok, why = fp8_device_support(device)
            if not ok:
                raise RuntimeError(f"FP8Training cannot run here: {why}. Train without it, or pass emulate=True "
                                   "to see FP8 numerics (no speed-up).")
        converted, skipped = self.plan(model)
        if not converted:
            msg = ("FP8Training: no Linear layer qualifies (" +
                   "; ".join(f"{k or 'model'}: {v}" for k, v in skipped.items()) + ")" if skipped else
                   "FP8Training: the model has no nn.Linear layer")
            if self.require_layers:
                raise ValueError(msg + ". Pass size_filter=False to convert small layers anyway (slower), "
                                 "or remove the callback.")
            warnings.warn(msg, stacklevel=2)
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = Float8LinearConfig.from_recipe_name(self.recipe)
        if self.emulate:
            config = dataclasses.replace(config, emulate=True)
        modules = dict(model.named_modules())
        self._originals = {fqn: modules[fqn] for fqn in converted}
        wanted = set(converted)
        convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn in wanted)
        self.telemetry.set_meta(self.telemetry_name, device=device.type, emulate=self.emulate, recipe=self.recipe,
                                converted=converted, skipped=skipped)

    def restore(self):
        if not self._originals or self.learn is None:
            self._originals = {}
            return
        model = self.learn.model
        for fqn, original in self._originals.items():
            parent_name, _, child = fqn.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            current = getattr(parent, child)
            original.weight, original.bias = current.weight, current.bias  # the trained Parameters
            setattr(parent, child, original)
        self._originals = {}


def _fp8_for_tests():
    return FP8Training(emulate=True, size_filter=False)


register("fp8", _fp8_for_tests, "model", task="sequence")
