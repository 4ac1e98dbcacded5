#!/usr/bin/env bash
# One entry point for a fresh machine: installs uv (from PyPI) if missing, installs the
# workspace from uv.lock, then runs a job.
#
#   ./run.sh main     run the main job: mini-exp-1 (quick profile) on the embedded default
#   ./run.sh test     check the layer contract, run the test-suite in parallel (all packages but
#                     fcr-sample, then fcr-sample alone); extra arguments go to the first pytest
#   ./run.sh test --fast   the fast lane: the workspace's tests not marked slow
#   ./run.sh sync     only install
set -euo pipefail
cd "$(dirname "$0")"

log() { printf '\033[1m[run.sh]\033[0m %s\n' "$*" >&2; }

ensure_uv() {
    if command -v uv >/dev/null 2>&1; then return; fi
    if ! python3 -c "import uv" >/dev/null 2>&1; then
        # A bare Debian image may lack python3 or pip; both come from the Debian archive.
        if ! python3 -m pip --version >/dev/null 2>&1; then ensure_apt python3 python3-pip; fi
        log "installing uv from PyPI"
        python3 -m pip install --quiet --user uv 2>/dev/null \
            || python3 -m pip install --quiet --break-system-packages --user uv 2>/dev/null \
            || python3 -m pip install --quiet uv
    fi
    # Ask the package where its binary is: a user, system or venv install each puts it elsewhere.
    local uv_bin
    uv_bin="$(python3 -c "import uv; print(uv.find_uv_bin())" 2>/dev/null)" \
        || { log "uv did not install; run 'python3 -m pip install uv' and retry"; exit 1; }
    export PATH="$(dirname "$uv_bin"):$PATH"
}

# Debian packages: the embedded default's data ships as one (all the main job needs); the emoji backbone's
# Noto colour emoji font and Unicode's emoji-test.txt as two more (sync and test install them); the browser
# tests drive Chromium.
APT_PACKAGES=(dataset-fashion-mnist)
APT_EMOJI_PACKAGES=(fonts-noto-color-emoji unicode-data)
APT_TEST_PACKAGES=(chromium)
ensure_apt() {
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return
    local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    log "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

sync_workspace() {
    ensure_uv
    log "installing the workspace from uv.lock"
    # Precompile bytecode once: environments that set PYTHONDONTWRITEBYTECODE would otherwise
    # recompile torch/diffusers in every process (~15 s per test subprocess on 2 cores). Measured
    # against letting Python write it on import (the suite imports ~5,900 of ~17,900 modules): that
    # saves ~47 s of install on the 2-core box, but both test workers then compile the same modules
    # and a fresh clone's ./run.sh test took as long (404 and 425 s against 425 and 422 s).
    export UV_COMPILE_BYTECODE=1
    # --all-extras: clean-fid (Inception) and torchmetrics (CLIPScore), so their tests run here.
    uv sync --locked --all-packages --all-extras --quiet
}

# The CPUs this process may use: those in its affinity mask (nproc, without the OpenMP variables it
# also honours), capped by a container's CPU quota (cgroup v2 cpu.max or v1 cfs_quota_us), rounded up.
usable_cpus() {
    local n quota=max period=1
    n="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
    { read -r quota period </sys/fs/cgroup/cpu.max \
        || { read -r quota </sys/fs/cgroup/cpu/cpu.cfs_quota_us && read -r period </sys/fs/cgroup/cpu/cpu.cfs_period_us; }
    } 2>/dev/null || quota=max
    if [[ "$quota" =~ ^[0-9]+$ && "$period" =~ ^[0-9]+$ && "$period" -gt 0 ]]; then
        quota=$(( (quota + period - 1) / period ))
        [ "$quota" -lt "$n" ] && n="$quota"
    fi
    echo "$n"
}

cmd="${1:-help}"; shift || true
case "$cmd" in
    sync)
        ensure_apt "${APT_PACKAGES[@]}" "${APT_EMOJI_PACKAGES[@]}"
        sync_workspace
        ;;
    main)
        ensure_apt "${APT_PACKAGES[@]}"
        sync_workspace
        exec uv run --no-sync fcr-eval run experiments/mini-exp-1.toml --profile quick "$@"
        ;;
    test)
        ensure_apt "${APT_PACKAGES[@]}" "${APT_EMOJI_PACKAGES[@]}" "${APT_TEST_PACKAGES[@]}"
        sync_workspace
        log "layer contract (.importlinter)"
        uv run --no-sync lint-imports
        # One worker per CPU this process may use. Not xdist's "-n auto": with psutil installed (accelerate
        # needs it) that counts *physical* cores, so a 2-vCPU cloud box whose two vCPUs are the hyperthreads
        # of one core gets a single worker and leaves a hardware thread idle. Measured on the 2-core box,
        # in-tree, back to back: one worker where there are two CPUs, 475 s against 279 s for the
        # workspace's tests; two workers on one CPU (taskset -c 0), 572 s against 551 s for one — a worker
        # too many costs little. What a hyperthread adds was not measured (no such machine here).
        workers="$(usable_cpus)"
        log "tests: the workspace, in parallel, $workers workers (one per CPU)"
        markers="not gpu and not checkpoint"
        if [ "${1:-}" = "--fast" ]; then
            shift
            log "fast lane: tests marked slow are left out; fcr-sample alone is not re-run"
            exec uv run --no-sync pytest -n "$workers" --dist loadfile -m "$markers and not slow" --durations=20 "$@"
        fi
        # --dist loadfile: a module's tests share one worker, so a module-scoped fixture (a whole
        # experiment run) runs once, not once per worker.
        # --durations=20: the slowest tests, printed by every CI run (a test past a minute says why
        # in its docstring). fcr-sample's own tests run once, below, with only fcr-sample installed
        # (the stricter of the two environments), not twice. Run beside the workspace's workers
        # instead (one process, one thread) the whole took longer on the 2-core box (442 s against
        # 386-425 s): the two workers leave a core idle too rarely for a third process to gain.
        # Likewise -n 3 (294 s against 265 s for -n 2, in-tree), and eatmydata: the suite makes ~6,200
        # fsync/fdatasync calls (DuckDB's WAL commits), 0.15 ms each here; even at 10 ms a sync (simulated
        # with an LD_PRELOAD shim) they added only ~30 s.
        uv run --no-sync pytest -n "$workers" --dist loadfile -m "$markers" --durations=20 --ignore=tests/fcr_sample "$@"
        log "tests: fcr-sample installed alone (torch, diffusers, tqdm + its test group)"
        # Without precompiled bytecode: its tests start no subprocesses, so only the workers compile
        # what they import, and that is cheaper than compiling the whole environment (this stage from a
        # fresh .venv-fcr-sample, PYTHONDONTWRITEBYTECODE=1 as on this box, four runs each, interleaved:
        # 60-70 s, median 60.5, against 64-85 s, median 75).
        UV_COMPILE_BYTECODE=0 UV_PROJECT_ENVIRONMENT=.venv-fcr-sample uv sync --locked --package fcr-sample \
            --no-default-groups --group test --quiet
        UV_PROJECT_ENVIRONMENT=.venv-fcr-sample uv run --no-sync --package fcr-sample \
            python -m pytest tests/fcr_sample -n "$workers" --dist loadfile -m "not gpu and not checkpoint" -q -p no:cacheprovider \
            --durations=10
        ;;
    *)
        sed -n '2,9p' "$0"
        exit 2
        ;;
esac
