"""Activation checkpointing in plain PyTorch: find a model's blocks, measure what each one keeps for
backward, choose blocks to fit a memory budget, and wrap their forward in `torch.utils.checkpoint`.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)) for _ in range(3)))
>>> blocks = find_blocks(model)
>>> list(blocks)
['0', '1', '2']
>>> per_block, total = saved_activation_bytes(model, blocks, (torch.randn(4, 8),))
>>> with checkpointed(blocks):
...     model(torch.randn(4, 8)).sum().backward()
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = ["SAVED_OPS", "checkpointed", "choose_blocks", "find_blocks", "keep_matmuls_policy", "restore_forward",
           "saved_activation_bytes", "wrap_forward"]

_CONTAINERS = (nn.Sequential, nn.ModuleList)


def _is_layer(module: nn.Module) -> bool:
    return not any(module.children())


def find_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The model's blocks, by name: the outermost modules that sit in an `nn.Sequential` or `nn.ModuleList`
    and contain layers of their own (a transformer's layers, a CNN's conv-norm-activation stages). A
    container of blocks is searched, not taken whole. A single layer is not a block: checkpointing it keeps
    its input, which is all it would have kept anyway."""
    blocks: dict[str, nn.Module] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if _is_layer(child):
                continue
            group = isinstance(child, _CONTAINERS) and not all(_is_layer(g) for g in child.children())
            if isinstance(module, _CONTAINERS) and not group:
                blocks[prefix + name] = child
            else:
                visit(child, f"{prefix}{name}.")

    visit(model, "")
    return blocks


_aten = torch.ops.aten
# Ops whose outputs selective checkpointing keeps: the expensive ones (matmuls, convolutions, attention).
SAVED_OPS = frozenset(getattr(_aten, name) for name in (
    "mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention") if hasattr(_aten, name))


def keep_matmuls_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing: keep the outputs of matmuls, convolutions and attention, recompute the
    cheap element-wise ops (activations, norms, adds) in backward."""
    if getattr(func, "overloadpacket", func) in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def wrap_forward(module: nn.Module, selective: bool = False) -> None:
    """Make `module`'s forward run under `torch.utils.checkpoint.checkpoint(use_reentrant=False)` when
    gradients are on (training); plain otherwise. `restore_forward` undoes it."""
    if "_effilab_forward" in module.__dict__:
        return
    module.__dict__["_effilab_forward"] = module.__dict__.get("forward")  # an instance forward, if any
    module.__dict__["_effilab_selective"] = selective
    # A method bound to the module, not a closure over it: `copy.deepcopy` (model growth copying a block, a
    # FLOP count on a copy) binds the copy's forward to the copy, so the copy computes with its own weights.
    module.forward = types.MethodType(_checkpointed_forward, module)


def _checkpointed_forward(module: nn.Module, *args, **kwargs):
    previous = module.__dict__["_effilab_forward"]
    original = previous if previous is not None else types.MethodType(type(module).forward, module)
    if not torch.is_grad_enabled():
        return original(*args, **kwargs)
    context_fn = (partial(create_selective_checkpoint_contexts, keep_matmuls_policy)
                  if module.__dict__["_effilab_selective"] else _noop_contexts)
    return checkpoint(original, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def restore_forward(module: nn.Module) -> None:
    """Undo `wrap_forward` (nothing if it was not wrapped)."""
    if "_effilab_forward" not in module.__dict__:
        return
    previous = module.__dict__.pop("_effilab_forward")
    module.__dict__.pop("_effilab_selective", None)
    if previous is None:
        del module.forward
    else:
        module.forward = previous


def _noop_contexts():
    return contextlib.nullcontext(), contextlib.nullcontext()


@contextlib.contextmanager
def checkpointed(blocks: dict[str, nn.Module] | list[nn.Module], selective: bool = False) -> Iterator[None]:
    """`blocks` checkpointed inside the `with`, restored on any exit."""
    modules = list(blocks.values()) if isinstance(blocks, dict) else list(blocks)
    try:
        for m in modules:
            wrap_forward(m, selective)
        yield
    finally:
        for m in modules:
            restore_forward(m)


class _MatmulOutputs(TorchDispatchMode):
    """Bytes of the outputs of `SAVED_OPS` per running block: what selective checkpointing keeps. (Selective
    checkpointing stores them in its own cache, which `saved_tensors_hooks` do not see; a dispatch mode is
    how PyTorch's own tools, such as torchtitan's op-level policy, look at ops.)"""

    def __init__(self, stack: list[str], kept: dict[str, int]):
        super().__init__()
        self.stack, self.kept, self.seen = stack, kept, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.stack and func.overloadpacket in SAVED_OPS:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                    self.seen.add(t.untyped_storage().data_ptr())
                    self.kept[self.stack[-1]] += t.untyped_storage().nbytes()
        return out


def saved_activation_bytes(model: nn.Module, blocks: dict[str, nn.Module], inputs: tuple,
                           selective: bool = False) -> tuple[dict[str, int], int]:
    """Bytes the autograd graph keeps for backward during one forward of `model(*inputs)`: per block, what
    checkpointing that block would free (its saved tensors other than its inputs; with `selective`, less the
    outputs of its matmuls, convolutions and attention, which selective checkpointing keeps), and in all.

    Counted through `torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters excluded.
    The forward leaves no trace: the random generators are forked, buffers (BatchNorm statistics) restored,
    and the graph is dropped without a backward.
    """
    # a sharded (FSDP2 DTensor) parameter has no storage of its own: its local shard's
    param_ptrs = {getattr(p, "to_local", lambda p=p: p)().untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    per_block = dict.fromkeys(blocks, 0)
    kept = dict.fromkeys(blocks, 0)
    inputs_of: dict[str, set[int]] = {}
    stack: list[str] = []
    total = 0

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen or ptr in param_ptrs or ptr == 0:
            return t
        seen.add(ptr)
        total += storage.nbytes()
        if stack and ptr not in inputs_of[stack[-1]]:
            per_block[stack[-1]] += storage.nbytes()
        return t

    def pre(name):
        def hook(module, args):
            inputs_of[name] = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            stack.append(name)
        return hook

    def post(name):
        def hook(module, args, out):
            stack.pop()
        return hook

    handles = [h for name, m in blocks.items()
               for h in (m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name)))]
    buffers = [b.detach().clone() for b in model.buffers()]
    devices = [d.index for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    try:
        with contextlib.ExitStack() as ctx:
            ctx.enter_context(torch.random.fork_rng(devices=devices))
            ctx.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            if selective:
                ctx.enter_context(_MatmulOutputs(stack, kept))
            out = model(*inputs)
            del out
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
    if selective:
        per_block = {n: max(0, b - kept[n]) for n, b in per_block.items()}
    return per_block, total


def choose_blocks(per_block: dict[str, int], total: int, budget: float) -> list[str]:
    """The fewest blocks (largest saving first) whose checkpointing brings `total` saved bytes to at most
    `budget` bytes; every block if even that does not reach it."""
    chosen, remaining = [], total
    for name, saved in sorted(per_block.items(), key=lambda kv: -kv[1]):
        if remaining <= budget:
            break
        chosen.append(name)
        remaining -= saved
    return [n for n in per_block if n in chosen]  # in model order
