"""Initialisation schemes in plain PyTorch: residual gates (ReZero / SkipInit), Fixup-style rescaling, LSUV,
a whitening first convolution from data patches (airbench), and a signal-propagation table at step 0."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .residual import WEIGHT_LAYERS, ResidualBlock, require_residual_blocks

__all__ = ["fixup_", "insert_gates", "lsuv_", "signal_propagation", "whiten_conv_"]


def _check_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@torch.no_grad()
def insert_gates(model: nn.Module, init: float = 0.0) -> list[nn.Parameter]:
    """Give every residual block without one a learnable scalar gate `alpha` (`x + alpha * branch(x)`),
    initialised to `init`: 0 is ReZero (Bachlechner et al. 2020) and SkipInit (De & Smith 2020), whose
    blocks then start as the identity. Returns the new parameters (add them to the optimizer). The gate
    sits on the branch's device, in the dtype of the branch's first parameter."""
    blocks = [model] if isinstance(model, ResidualBlock) else require_residual_blocks(model, "residual gates")
    new = []
    for block in blocks:
        if block.gate is None:
            ref = next(block.parameters(), None)
            kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
            block.gate = nn.Parameter(torch.full((), float(init), **kw))
            new.append(block.gate)
    return new


@torch.no_grad()
def fixup_(model: nn.Module) -> list[dict]:
    """Fixup-style rescaling (Zhang, Dauphin & Ma, ICLR 2019) of every residual block: zero the last layer of
    each branch (`block.last_layers()`, weight and bias) and scale the other weight layers of the branch by
    `L ** (-1 / (2m - 2))` (L residual branches, m weight layers per branch). Fixup's scalar biases and
    multiplier and the zero-initialised classifier are not added (they change the architecture; gates:
    `insert_gates(model, 1.0)`). Returns one row per block: {block, m, scale}."""
    blocks = require_residual_blocks(model, "Fixup")
    n = len(blocks)
    rows = []
    for i, block in enumerate(blocks):
        layers, last = block.branch_layers(), block.last_layers()
        if not last:
            raise ValueError(f"Fixup: residual block {i} ({type(block).__name__}) names no last layer to zero; "
                             "override ResidualBlock.last_layers()")
        m = len(layers)
        scale = n ** (-1.0 / (2 * m - 2)) if m > 1 else 1.0
        for layer in layers:
            if any(layer is l_ for l_ in last):
                layer.weight.zero_()
                if getattr(layer, "bias", None) is not None:
                    layer.bias.zero_()
            else:
                layer.weight.mul_(scale)
        rows.append({"block": i, "m": m, "scale": scale})
    return rows


def _shared_weights(model: nn.Module) -> set[int]:
    """Parameters that belong to modules other than Linear/Conv (e.g. an embedding tied to the head)."""
    return {id(p) for m in model.modules() if not isinstance(m, WEIGHT_LAYERS)
            for p in m.parameters(recurse=False)}


@torch.no_grad()
def lsuv_(model: nn.Module, x: torch.Tensor, tol: float = 0.1, max_iter: int = 10,
          generator: torch.Generator | None = None, orthogonal: bool = True) -> list[dict]:
    """Layer-sequential unit-variance init (Mishkin & Matas, ICLR 2016): each Linear/Conv in registration
    order gets an orthogonal weight, then its weight is divided by the standard deviation of its output on
    the batch `x` until `|std - 1| < tol` (at most `max_iter` forwards per layer); its bias is zeroed.

    The model runs in eval mode (BatchNorm statistics untouched) and every module's train/eval flag is put
    back afterwards, as are the hooks (the reference implementation leaves the model in eval mode). Layers
    whose weight is shared with another kind of module (a tied embedding) are left alone. Returns one row per
    layer: {layer, std_before, std_after, iterations}."""
    tol, max_iter = _check_number(tol, "tol"), int(max_iter)
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"tol must be > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    shared = _shared_weights(model)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)
              and id(m.weight) not in shared and m.weight.dim() >= 2]
    flags = [(m, m.training) for m in model.modules()]
    out = {}

    def grab(module, inputs, output):
        out["y"] = output

    rows = []
    try:
        model.eval()
        for name, layer in layers:
            if orthogonal:
                nn.init.orthogonal_(layer.weight, generator=generator)
            if layer.bias is not None:
                layer.bias.zero_()
            handle = layer.register_forward_hook(grab)
            try:
                std0 = None
                for it in range(max_iter + 1):
                    model(x)
                    std = out.pop("y").float().std()
                    std_value = float(std)  # sync-ok: LSUV runs once, before training
                    std0 = std_value if std0 is None else std0
                    if abs(std_value - 1.0) < tol or it == max_iter or std_value == 0.0:
                        break
                    layer.weight.div_(std)
                rows.append({"layer": name, "std_before": std0, "std_after": std_value, "iterations": it})
            finally:
                handle.remove()
    finally:
        for m, flag in flags:
            m.training = flag
    return rows


def first_conv(model: nn.Module) -> nn.Conv2d:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise TypeError(f"{type(model).__name__} has no Conv2d to whiten: the whitening init needs an image model "
                        "whose first layer is a convolution")
    return conv


@torch.no_grad()
def whiten_conv_(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
    """airbench's whitening init: the first convolution's filters become the eigenvectors of the covariance of
    the images' k x k patches, each divided by `sqrt(eigenvalue + eps)`, and their negatives (so a following
    ReLU keeps both signs). The `min(out_channels // 2, C*k*k)` directions of largest variance are used; any
    other filters keep their weights. The bias (if any) is zeroed. Returns the eigenvalues (descending)."""
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise TypeError(f"whitening needs an ungrouped nn.Conv2d, got {conv!r}")
    if images.dim() != 4 or images.shape[1] != conv.in_channels:
        raise ValueError(f"images must be (N, {conv.in_channels}, H, W) for {conv}, got {tuple(images.shape)}")
    kh, kw = conv.kernel_size
    patches = F.unfold(images.float(), (kh, kw), dilation=conv.dilation)  # (N, C*kh*kw, L)
    flat = patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()
    cov = flat.T @ flat / len(flat)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)  # largest variance first
    k = min(conv.out_channels // 2, eigenvectors.shape[1])
    if k < 1:
        raise ValueError(f"{conv} has fewer than 2 output channels: nothing to whiten with")
    filters = (eigenvectors[:, :k].T / torch.sqrt(eigenvalues[:k, None].clamp_min(0) + eps))
    filters = filters.reshape(k, conv.in_channels, kh, kw).to(conv.weight)
    conv.weight[:k] = filters
    conv.weight[k:2 * k] = -filters
    if conv.bias is not None:
        conv.bias.zero_()
    return eigenvalues.float()


def signal_propagation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_func=None) -> list[dict]:
    """Per-layer scales at step 0, for pictures of signal propagation: one forward and backward of a copy of
    `model` on `(x, y)` (the model itself, its BatchNorm statistics and gradients are untouched). One row per
    Linear/Conv and per residual block, in forward order: {layer, kind, act_std (output), grad_std (of the
    output), weight_grad_norm}."""
    model = copy.deepcopy(model)
    model.train()
    loss_func = loss_func or (lambda p, t: F.cross_entropy(p.reshape(-1, p.shape[-1]), t.reshape(-1)))
    watched = [(name, m) for name, m in model.named_modules()
               if isinstance(m, WEIGHT_LAYERS) or isinstance(m, ResidualBlock)]
    acts, order, handles = {}, [], []

    def hook(name):
        def fn(module, inputs, output):
            if not output.requires_grad:
                return
            output.retain_grad()
            acts[name] = output
            order.append(name)
        return fn

    for name, m in watched:
        handles.append(m.register_forward_hook(hook(name)))
    try:
        loss = loss_func(model(x), y)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    kinds = dict(watched)
    rows = []
    for name in dict.fromkeys(order):
        a, m = acts[name], kinds[name]
        w = getattr(m, "weight", None) if not isinstance(m, ResidualBlock) else None
        rows.append({
            "layer": name, "kind": type(m).__name__,
            "act_std": float(a.detach().float().std()),  # sync-ok: once, outside training
            "grad_std": float(a.grad.float().std()) if a.grad is not None else 0.0,  # sync-ok
            "weight_grad_norm": float(w.grad.norm()) if w is not None and w.grad is not None else 0.0,  # sync-ok
        })
    return rows
