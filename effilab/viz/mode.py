"""Which dashboard to show: a live widget, a static figure at the end, or nothing.

The rule, first match wins (`choose_mode`):

1. the explicit argument: `Dashboard(mode="live" | "static" | "off")`;
2. the environment variable `EFFILAB_DASHBOARD` (`live`, `static` or `off`);
3. continuous integration (`CI` set and not false-like): static;
4. no Jupyter kernel (a plain Python script, a terminal IPython): static;
5. a front end that draws widgets: JupyterLab / Notebook 7 (`JPY_SESSION_NAME`), VS Code (`VSCODE_PID`),
   Colab (`COLAB_RELEASE_TAG`, or `google.colab` imported): live;
6. otherwise (a kernel run headless by papermill, nbclient or nbmake): static.

Static leaves no widget state in a saved notebook, only a plotly figure and a text summary.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import NamedTuple

__all__ = ["ENV_VAR", "MODES", "ModeChoice", "choose_mode", "decide_mode", "in_kernel"]

MODES = ("live", "static", "off")
ENV_VAR = "EFFILAB_DASHBOARD"
_FALSE = ("", "0", "false", "no", "off")
_FRONT_ENDS = (("JPY_SESSION_NAME", "JupyterLab / Notebook"), ("VSCODE_PID", "VS Code"),
               ("COLAB_RELEASE_TAG", "Colab"))


class ModeChoice(NamedTuple):
    mode: str  # "live", "static" or "off"
    reason: str  # which rule decided, for messages


def in_kernel() -> bool:
    """Whether this process is a Jupyter (ipykernel) kernel; IPython is not imported to find out."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def _check(mode: str, where: str) -> str:
    m = mode.strip().lower()
    if m not in MODES:
        raise ValueError(f"dashboard mode from {where} must be one of {MODES} (or None / 'auto'), "
                         f"got {mode!r}")
    return m


def decide_mode(explicit: str | None = None, env: Mapping[str, str] | None = None, kernel: bool | None = None,
                modules: Mapping | None = None) -> ModeChoice:
    """The mode and the rule that chose it (see the module docstring); `env`, `kernel` and `modules`
    default to this process's environment, `in_kernel()` and `sys.modules`."""
    env = os.environ if env is None else env
    if explicit is not None and explicit.strip().lower() != "auto":
        return ModeChoice(_check(explicit, "the mode argument"), "mode argument")
    value = env.get(ENV_VAR, "")
    if value.strip() and value.strip().lower() != "auto":
        return ModeChoice(_check(value, f"${ENV_VAR}"), f"{ENV_VAR}={value}")
    if env.get("CI", "").strip().lower() not in _FALSE:
        return ModeChoice("static", "continuous integration (CI is set)")
    if not (in_kernel() if kernel is None else kernel):
        return ModeChoice("static", "not in a Jupyter kernel")
    for var, name in _FRONT_ENDS:
        if env.get(var):
            return ModeChoice("live", f"{name} front end ({var} is set)")
    if "google.colab" in (sys.modules if modules is None else modules):
        return ModeChoice("live", "Colab front end (google.colab is imported)")
    return ModeChoice("static", "a kernel without a known front end (papermill, nbclient, ...)")


def choose_mode(explicit: str | None = None, env: Mapping[str, str] | None = None, kernel: bool | None = None,
                modules: Mapping | None = None) -> str:
    """`"live"`, `"static"` or `"off"`, by the rule of the module docstring."""
    return decide_mode(explicit, env, kernel, modules).mode
