# shellcheck shell=bash
# Set up (or reuse) everything effilab needs, then export the environment.
#
#   source scripts/env.sh        # from scripts/main.sh and scripts/test.sh
#
# Idempotent and quiet: prints one line on success,
#   effilab env: <venv> (reused|built in Ns)
# and on failure the tail of the installer log, then returns non-zero.
#
# What it does:
#  1. Debian packages (apt-get, only those missing; needs root, else a warning).
#  2. A virtual environment cached outside the repo, shared by every clone:
#       ${EFFILAB_ENV_DIR:-$HOME/.cache/effilab}/venv-<key>
#     key = first 16 hex of sha256(pyproject.toml + scripts/constraints.txt + this file).
#     venv-<key> is a symlink to the real directory venv-<key>.<stamp>; the symlink
#     is created (atomic rename) only after a fully successful install, and the
#     real directory then holds the marker file .effilab-ok. A venv can't be moved
#     after creation (its scripts' #! lines hold its path), hence the symlink.
#     Older venv-* entries are removed after a build (each is several GB).
#  3. Exports PATH (venv first), PYTHONPATH (this checkout first: effilab is
#     imported from the checkout that sourced this file, never installed into the
#     shared venv), VIRTUAL_ENV, MPLBACKEND=Agg, PYTHONHASHSEED=0.
#
# Knobs: EFFILAB_ENV_DIR (cache dir), EFFILAB_PYTHON (base interpreter, default
# python3), EFFILAB_SKIP_APT=1 (don't touch Debian packages).

# Debian packages: Fashion-MNIST files (/usr/share/datasets/fashion-mnist) and
# Chromium + ChromeDriver for the real-browser dashboard tests. fonts-liberation
# is Chromium's recommended font (we install without recommends), so that text in
# screenshots renders.
EFFILAB_APT_PKGS="dataset-fashion-mnist chromium chromium-driver fonts-liberation"

# Python packages come from pyproject.toml (dependencies + the `test` extra). The
# `playwright` package drives Debian's /usr/bin/chromium: never run `playwright
# install` (no browser downloads on these machines).

_effilab_log_tail() {  # $1 = log file, $2 = what failed
    echo "effilab env: $2 failed; last lines of $1:" >&2
    tail -n 40 "$1" >&2
}

# Run "$@" with output appended to log file $1, dropping pip's 'Location ... is
# ignored' warnings (this machine's global pip config lists local wheel folders).
_effilab_logged() {
    local log=$1; shift
    echo "+ $*" >>"$log"
    "$@" </dev/null 2>&1 | grep -v --line-buffered -E "^WARNING: Location '.*' is ignored" >>"$log"
    return "${PIPESTATUS[0]}"
}

_effilab_apt() {  # $1 = log file
    local log=$1 p missing=()
    [ "${EFFILAB_SKIP_APT:-0}" = 1 ] && return 0
    command -v dpkg-query >/dev/null 2>&1 || return 0   # not Debian: nothing to do
    for p in $EFFILAB_APT_PKGS; do
        # stricter `dpkg -s`: a removed package with config files left is "not installed"
        [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "effilab env: WARNING: missing Debian packages: ${missing[*]} (not root, not installing;" \
             "tests that need them will skip). Install with: sudo apt-get install ${missing[*]}" >&2
        return 0
    fi
    DEBIAN_FRONTEND=noninteractive _effilab_logged "$log" apt-get -o DPkg::Lock::Timeout=600 update -q &&
    DEBIAN_FRONTEND=noninteractive _effilab_logged "$log" apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" ||
        { _effilab_log_tail "$log" "apt-get install ${missing[*]}"; return 1; }
}

# Create venv $1 and install everything into it; $2 = repo root, $3 = log file.
_effilab_fill_venv() {
    local real=$1 root=$2 log=$3
    _effilab_logged "$log" "${EFFILAB_PYTHON:-python3}" -m venv "$real" ||
        { _effilab_log_tail "$log" "python -m venv"; return 1; }

    # Dependencies of effilab (pyproject's dependencies + `test` extra), not effilab
    # itself: the venv is shared between clones, the code comes from PYTHONPATH.
    "$real/bin/python" - "$root/pyproject.toml" >"$real/effilab-requirements.txt" 2>>"$log" <<'PY' ||
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
reqs = project.get("dependencies", []) + project.get("optional-dependencies", {}).get("test", [])
print("\n".join(reqs))
PY
        { _effilab_log_tail "$log" "reading pyproject.toml"; return 1; }
    PIP_DISABLE_PIP_VERSION_CHECK=1 _effilab_logged "$log" "$real/bin/python" -m pip install \
        --no-input --progress-bar off \
        -c "$root/scripts/constraints.txt" -r "$real/effilab-requirements.txt" ||
        { _effilab_log_tail "$log" "pip install"; return 1; }

    # The console script `effilab` (effilab itself isn't installed, see above).
    printf '#!/bin/sh\nexec "$(dirname "$0")/python" -m effilab "$@"\n' >"$real/bin/effilab" &&
        chmod +x "$real/bin/effilab" || return 1

    # Sanity checks: key imports, and the `python3` Jupyter kernel papermill uses.
    _effilab_logged "$log" "$real/bin/python" -c \
        'import torch, torchvision, fastai.vision.all, accelerate, playwright, papermill, ipykernel, pytest' &&
    _effilab_logged "$log" "$real/bin/jupyter" kernelspec list ||
        { _effilab_log_tail "$log" "checking the new venv"; return 1; }
    grep -q "python3 *$real/share/jupyter/kernels/python3" "$log" ||
        { _effilab_log_tail "$log" "finding the venv's python3 Jupyter kernel"; return 1; }
}

_effilab_build_venv() {  # $1 = env dir, $2 = key, $3 = repo root, $4 = log file
    local dir=$1 key=$2 root=$3 log=$4
    local link="$dir/venv-$key" real e
    real="$dir/venv-$key.$(date +%Y%m%d%H%M%S).$$"

    # Stale partial builds (ours hold the lock, so none is in progress) and a
    # broken venv-<key> are removed first.
    for e in "$dir"/venv-"$key".*; do [ -e "$e" ] && rm -rf "$e"; done
    rm -rf "$link"

    _effilab_fill_venv "$real" "$root" "$log" || { rm -rf "$real"; return 1; }

    date >"$real/.effilab-ok" || return 1

    # Atomically publish: venv-<key> appears only now, complete.
    ln -s "$(basename "$real")" "$link.tmp.$$" && mv -T "$link.tmp.$$" "$link" || return 1

    # Older envs (other keys) are removed to save disk.
    for e in "$dir"/venv-*; do
        case $e in "$link" | "$real") ;; *) rm -rf "$e" ;; esac
    done
    for e in "$dir"/install-*.log; do [ "$e" = "$log" ] || rm -f "$e"; done
    return 0
}

_effilab_venv_ok() { [ -f "$1/.effilab-ok" ] && "$1/bin/python" -c '' 2>/dev/null; }

_effilab_env_main() {
    local root dir key venv log t0 rc how f
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || return 1
    dir=${EFFILAB_ENV_DIR:-${HOME:-/root}/.cache/effilab}
    for f in pyproject.toml scripts/constraints.txt scripts/env.sh; do
        [ -f "$root/$f" ] || { echo "effilab env: $root/$f is missing" >&2; return 1; }
    done
    key=$(cat "$root/pyproject.toml" "$root/scripts/constraints.txt" "$root/scripts/env.sh" | sha256sum | cut -c1-16) ||
        return 1
    venv="$dir/venv-$key"
    log="$dir/install-$key.log"
    mkdir -p "$dir" || return 1

    t0=$(date +%s)
    how=reused
    # Fast path: nothing to install -> no lock, no apt, no pip.
    if ! _effilab_venv_ok "$venv" || ! _effilab_apt_ok; then
        # One set-up at a time per env dir (CI and a developer may start together).
        exec {_effilab_lock_fd}>"$dir/.lock" || return 1
        if ! flock -n "$_effilab_lock_fd"; then
            echo "effilab env: waiting for another set-up in $dir to finish..." >&2
            flock "$_effilab_lock_fd"
        fi
        rc=0
        if ! _effilab_apt_ok; then
            : >"$dir/apt.log"
            _effilab_apt "$dir/apt.log" || rc=1
        fi
        if [ $rc -eq 0 ] && ! _effilab_venv_ok "$venv"; then   # re-check: another run may have built it
            : >"$log"
            echo "effilab env: building $venv (a few minutes; log: $log)..." >&2
            _effilab_build_venv "$dir" "$key" "$root" "$log" || rc=1
            how="built in $(($(date +%s) - t0))s"
        fi
        exec {_effilab_lock_fd}>&-
        unset _effilab_lock_fd
        [ $rc -eq 0 ] || return 1
    fi

    export VIRTUAL_ENV="$venv"
    case ":$PATH:" in ":$venv/bin:"*) ;; *) export PATH="$venv/bin:$PATH" ;; esac
    case ":${PYTHONPATH:-}:" in ":$root:"*) ;; *) export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" ;; esac
    export MPLBACKEND=Agg
    export PYTHONHASHSEED=0
    export EFFILAB_REPO_ROOT="$root"
    echo "effilab env: $venv ($how)" >&2
}

# True when no Debian package needs an install we could do (cheap: dpkg-query only).
_effilab_apt_ok() {
    local p
    [ "${EFFILAB_SKIP_APT:-0}" = 1 ] && return 0
    command -v dpkg-query >/dev/null 2>&1 || return 0
    for p in $EFFILAB_APT_PKGS; do
        [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || return 1
    done
}

_effilab_env_main
