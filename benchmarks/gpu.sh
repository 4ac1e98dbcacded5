#!/usr/bin/env bash
# One prepared GPU benchmark run (issue 13): fcr's caches next to the peers on an
# SD-v1.5-architecture UNet at 512² (random weights: speed does not depend on weight values),
# fp16, batch 1 and 8, DDIM-50 with CFG 7.5 —
#   no cache, FD-5/10/20 sequential and parallel, DeepCache (fcr's comparator and the package),
#   T-GATE, optionally no cache under torch.compile —
# then the FCR training-step ratio (benchmarks/train_step.py), with peak memory, then exp-1's quick
# profile through the runner on SD-v1.5-architecture random weights at 512², s/img per stage
# (benchmarks/exp1_stages.py: sampling, reference, features, metrics, store, ...). Markdown on stdout
# and in $OUT/gpu-benchmarks.md (or the path given with --out). Sized for <= 9 minutes on an H100/H200.
#
# It uses the machine's own PyTorch and never installs torch. What the machine lacks (diffusers,
# the DeepCache package, T-GATE, importlib_metadata) comes as wheels in benchmarks/wheels/
# (git-ignored), installed with --no-deps into a --target folder; the workspace packages come
# from their src/ folders on PYTHONPATH. The runner's stage benchmark also needs DuckDB, polars and
# clean-fid (benchmarks/wheels/runner/, fetched by --download-wheels): ~80 MB of wheels, more than
# one device call carries (64 MiB with the ~24 MB tree). Without them that section says so and is
# skipped; with them (a machine that has them, or a call that can carry them) it runs.
#
#   bash benchmarks/gpu.sh --download-wheels   # here, once: fetch the wheels (needs PyPI)
#   bash benchmarks/gpu.sh                     # on the GPU machine (device tool: carry benchmarks/wheels)
#   bash benchmarks/gpu.sh --dry-run           # anywhere: tiny sizes on CPU, checks the whole path
#   bash benchmarks/gpu.sh --compile           # also time no cache under torch.compile(unet)
#   bash benchmarks/gpu.sh --stages-only       # only the exp-1 stage benchmark (a call of its own on a GPU:
#                                              # the three sections together pass one call's 10 minutes)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/benchmarks/wheels"
# The versions uv.lock pins (pure-Python wheels).
PINNED=(diffusers==0.42.1 deepcache==0.1.1 tgate==1.0.0 importlib-metadata==9.0.1)
# What the runner adds (exp1_stages.py): binary wheels for the machine's Python 3.12, x86-64.
RUNNER_PINNED=(duckdb==2.0.0 polars==2.1.0 polars-runtime-32==2.1.0 clean-fid==0.1.35)

DRY_RUN=0
STAGES_ONLY=0
COMPILE=()
OUT_FILE=""
PYTHON="${PYTHON:-python3}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --download-wheels)
            mkdir -p "$WHEELS"
            "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
                --implementation py -d "$WHEELS" "${PINNED[@]}"
            mkdir -p "$WHEELS/runner"
            "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
                --platform manylinux2014_x86_64 --platform any -d "$WHEELS/runner" "${RUNNER_PINNED[@]}"
            ls -l "$WHEELS" "$WHEELS/runner"
            exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        --stages-only) STAGES_ONLY=1 ;;
        --compile) COMPILE=(--compile) ;;
        --out) OUT_FILE="$2"; shift ;;
        *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
    shift
done

OUT_DIR="${OUT:-$ROOT/runs/gpu}"
OUT_FILE="${OUT_FILE:-$OUT_DIR/gpu-benchmarks.md}"
mkdir -p "$(dirname "$OUT_FILE")"
log() { echo "[gpu.sh $(date -u +%H:%M:%S)] $*" >&2; }

# -- environment: the machine's torch, wheels for the rest, the workspace from src/ -------------
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "no PyTorch for $PYTHON: this script uses the machine's own torch and never installs it" >&2
    exit 1
fi
shopt -s nullglob
wheels=()
"$PYTHON" -c "import diffusers, DeepCache, tgate" 2>/dev/null || wheels+=("$WHEELS"/*.whl)
"$PYTHON" -c "import duckdb, polars, cleanfid" 2>/dev/null || wheels+=("$WHEELS"/runner/*.whl)
if ! "$PYTHON" -c "import diffusers, DeepCache, tgate" 2>/dev/null; then
    if [[ ${#wheels[@]} -eq 0 ]]; then
        echo "diffusers / deepcache / tgate are missing and $WHEELS has no wheels: run" \
             "'bash benchmarks/gpu.sh --download-wheels' where PyPI is reachable, then carry benchmarks/wheels" >&2
        exit 1
    fi
fi
if [[ ${#wheels[@]} -gt 0 ]]; then
    SITE="${TMPDIR:-/tmp}/fcr-gpu-site"
    log "installing ${#wheels[@]} wheels into $SITE (--no-deps; torch untouched)"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${wheels[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT/packages/fcr-common/src:$ROOT/packages/fcr-sample/src:$ROOT/packages/fcr-train/src:$ROOT/packages/fcr-eval/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

if [[ $DRY_RUN -eq 1 ]]; then
    SPEED=(--unet tiny --device cpu --dtype fp32 --threads 1 --batch 1 2 --steps 6 --rounds 1
           --strides 5 --deepcache 5 0)
    TRAIN=(--device cpu --threads 1 --batch-size 4 --repeats 1)
    STAGES=(--device cpu --tiny --samples 8 --threads 1)
    LIMIT_SPEED=300 LIMIT_TRAIN=120 LIMIT_STAGES=600
else
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "no CUDA device visible to torch: run on a GPU machine, or use --dry-run" >&2
        exit 1
    fi
    SPEED=(--unet sd15 --device cuda --dtype fp16 --batch 1 8 --steps 50 --rounds 3
           --strides 5 10 20 --fd-modes both --deepcache 5 0)
    TRAIN=(--device cuda --repeats 6 --sd-batch-size 4)
    STAGES=(--device cuda --samples 48)
    LIMIT_SPEED=330 LIMIT_TRAIN=120 LIMIT_STAGES=540
fi

# --- issue 26 (caches helper): the adaptive cache and a calibrated schedule beside DeepCache, with the
# adaptive DeepCache held to N5's schedule (its difference to fcr DeepCache-N5 is the signal's overhead).
SPEED+=(--adaptive deepcache 0.2 --calibrated deepcache "$([[ $DRY_RUN == 1 ]] && echo 3 || echo 10)")
# --- end issue 26

START=$(date +%s)
{
    echo "# GPU benchmarks (benchmarks/gpu.sh$([[ $DRY_RUN -eq 1 ]] && echo ' --dry-run: tiny sizes on CPU, not figures'))"
    echo
    echo "$("$PYTHON" -c 'import torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")')"
    echo "code $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'unknown (no git)'), $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
} > "$OUT_FILE"
[[ $STAGES_ONLY -eq 0 ]] && printf '## Sampling, side by side (benchmarks/sampler_speed.py)\n\n' >> "$OUT_FILE"

if [[ $STAGES_ONLY -eq 0 ]]; then
    log "sampling benchmark (limit ${LIMIT_SPEED}s)"
    timeout "$LIMIT_SPEED" "$PYTHON" "$ROOT/benchmarks/sampler_speed.py" "${SPEED[@]}" "${COMPILE[@]}" \
        --out "$OUT_FILE.sampling" || log "sampling benchmark failed or timed out (rc $?)"
    [[ -f "$OUT_FILE.sampling" ]] && cat "$OUT_FILE.sampling" >> "$OUT_FILE" && rm -f "$OUT_FILE.sampling"

    log "training-step benchmark (limit ${LIMIT_TRAIN}s)"
    {
        echo
        echo "## FCR training step vs plain fine-tuning (benchmarks/train_step.py)"
        echo
        echo '```'
    } >> "$OUT_FILE"
    timeout "$LIMIT_TRAIN" "$PYTHON" "$ROOT/benchmarks/train_step.py" "${TRAIN[@]}" \
        --json "$(dirname "$OUT_FILE")/train_step.json" 2>&1 | sed -n '/^{\|^\[/q;p' >> "$OUT_FILE" \
        || log "training-step benchmark failed or timed out"
    echo '```' >> "$OUT_FILE"
    echo >> "$OUT_FILE"
fi

echo "## exp-1 quick profile through the runner, s/img per stage (benchmarks/exp1_stages.py)" >> "$OUT_FILE"
echo >> "$OUT_FILE"
if "$PYTHON" -c "import duckdb, polars, cleanfid, transformers" 2>/dev/null; then
    log "exp-1 stage benchmark (limit ${LIMIT_STAGES}s)"
    STAGE_DIR="$(dirname "$OUT_FILE")/exp1-stages"
    rm -rf "$STAGE_DIR"
    timeout "$LIMIT_STAGES" "$PYTHON" "$ROOT/benchmarks/exp1_stages.py" "${STAGES[@]}" --out "$STAGE_DIR" \
        > "$OUT_FILE.stages" 2>"$OUT_FILE.stages.log" || log "exp-1 stage benchmark failed or timed out (rc $?): $(tail -3 "$OUT_FILE.stages.log")"
    sed -n '/^# exp-1/,$p' "$OUT_FILE.stages" | tail -n +3 >> "$OUT_FILE"
    rm -f "$OUT_FILE.stages" "$OUT_FILE.stages.log"
    rm -rf "$STAGE_DIR/sd" "$STAGE_DIR/clip"  # gigabytes of random weights, not results
else
    echo "skipped: duckdb / polars / clean-fid / transformers are not importable here (the runner's wheels are" \
         "~80 MB, more than one device call carries; see the header of benchmarks/gpu.sh)" >> "$OUT_FILE"
    log "exp-1 stage benchmark skipped: the runner's packages are missing"
fi
echo >> "$OUT_FILE"
echo "total $(( $(date +%s) - START )) s" >> "$OUT_FILE"

cat "$OUT_FILE"
log "report: $OUT_FILE"
