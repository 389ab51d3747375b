"""The dashboard's mode rule, one precedence step at a time."""

from __future__ import annotations

import pytest

from effilab.viz.mode import ENV_VAR, choose_mode, decide_mode, in_kernel

JUPYTERLAB = {"JPY_SESSION_NAME": "/home/me/run.ipynb"}


@pytest.mark.parametrize("explicit, env, kernel, modules, expected", [
    # 1. the argument beats everything
    ("live", {ENV_VAR: "off", "CI": "true"}, False, {}, "live"),
    ("static", JUPYTERLAB, True, {}, "static"),
    ("off", JUPYTERLAB, True, {}, "off"),
    ("LIVE", {}, False, {}, "live"),
    # 2. the environment override beats CI, the kernel and the front end
    (None, {ENV_VAR: "live", "CI": "1"}, False, {}, "live"),
    (None, {ENV_VAR: "off"} | JUPYTERLAB, True, {}, "off"),
    (None, {ENV_VAR: "static"} | JUPYTERLAB, True, {}, "static"),
    ("auto", {ENV_VAR: "live"}, False, {}, "live"),
    (None, {ENV_VAR: "auto"} | JUPYTERLAB, True, {}, "live"),
    # 3. CI beats a front end
    (None, {"CI": "true"} | JUPYTERLAB, True, {}, "static"),
    (None, {"CI": "false"} | JUPYTERLAB, True, {}, "live"),
    (None, {"CI": "0"} | JUPYTERLAB, True, {}, "live"),
    # 4. no kernel beats front-end markers (a script run from VS Code's terminal)
    (None, {"VSCODE_PID": "123"}, False, {}, "static"),
    (None, JUPYTERLAB, False, {"google.colab": object()}, "static"),
    # 5. front-end markers in a kernel
    (None, JUPYTERLAB, True, {}, "live"),
    (None, {"VSCODE_PID": "123"}, True, {}, "live"),
    (None, {"COLAB_RELEASE_TAG": "release-colab_2026"}, True, {}, "live"),
    (None, {}, True, {"google.colab": object()}, "live"),
    # 6. a kernel without a front end: papermill, nbclient
    (None, {}, True, {}, "static"),
    (None, {"JPY_SESSION_NAME": ""}, True, {}, "static"),
])
def test_precedence(explicit, env, kernel, modules, expected):
    assert choose_mode(explicit, env=env, kernel=kernel, modules=modules) == expected


def test_reason_names_the_rule():
    assert decide_mode(None, env={ENV_VAR: "off"}, kernel=True, modules={}).reason == f"{ENV_VAR}=off"
    assert "CI" in decide_mode(None, env={"CI": "yes"}, kernel=True, modules={}).reason
    assert "kernel" in decide_mode(None, env={}, kernel=False, modules={}).reason
    assert "VS Code" in decide_mode(None, env={"VSCODE_PID": "1"}, kernel=True, modules={}).reason


@pytest.mark.parametrize("explicit, env", [("fancy", {}), (None, {ENV_VAR: "widgets"})])
def test_wrong_values_are_errors(explicit, env):
    with pytest.raises(ValueError, match="live"):
        choose_mode(explicit, env=env, kernel=True, modules={})


def test_defaults_read_this_process(monkeypatch):
    # pytest is no kernel: static, unless the environment says otherwise.
    for var in (ENV_VAR, "CI"):
        monkeypatch.delenv(var, raising=False)
    assert not in_kernel()
    assert choose_mode() == "static"
    monkeypatch.setenv(ENV_VAR, "off")
    assert choose_mode() == "off"
