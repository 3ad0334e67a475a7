#!/usr/bin/env bash
# Smoke test of this project on the machine it runs on (an Ascend server after ./sync_to_remote.sh):
# environment, install, unit tests, conversion, a short fine-tune under torchrun. See --help.
set -euo pipefail

PROG=$(basename "$0")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)

usage() {
    cat <<EOF
Usage: [VAR=value ...] ./$PROG

Run from the project root on the target machine, after ./sync_to_remote.sh and pip install -e '.[npu]'.
Five stages, in order; the first that fails stops the run:
  [1/5] environment            python, torch, torch_npu, CANN, device (npu / cuda / cpu) and count,
                               npu-parallel env, the HCCL_* / ASCEND_* variables that are set
  [2/5] install check          import npu_parallel (from this project) works
  [3/5] unit tests             python -m pytest -q \${UNIT_TESTS:-tests}
  [4/5] conversion smoke test  python examples/test_deepseek_moe.py [--model_path \$MODEL_PATH]
  [5/5] short fine-tune        torchrun --standalone --nproc_per_node \${NPROC:-2}
                                 examples/train_deepseek_v2_lite.py --steps \${STEPS:-4}
                                 --max_length \${MAX_LENGTH:-64} --log_dir \$LOG_DIR/train
                                 [--model_path \$MODEL_PATH] [--tp_size \$TP_SIZE]
Each stage is shown on the console and logged to its own file under LOG_DIR; a summary ends the run.
Without an NPU or GPU, stages 4-5 run on the CPU (gloo); the example scripts skip device-only parts.
Stages 4-5 run with TORCH_NPU_FALLBACK_CPU_DISABLE=1: an operator that silently falls back to the CPU fails.

Environment variables:
  PYTHON           interpreter to use (default: the active venv's python, else python3, else python)
  LOG_DIR          log directory (default: logs/remote-test-YYYYmmdd-HHMMSS in the project root)
  UNIT_TESTS       space-separated pytest targets/arguments for stage 3 (default: tests)
  SKIP_UNIT_TESTS  1 (or true/yes): skip stage 3
  MODEL_PATH       Hugging Face checkpoint folder for stages 4-5 (default: a tiny model built on the fly)
  NPROC            processes (devices) for the fine-tune (default: 2)
  TP_SIZE          tensor-parallel size for the fine-tune (default: all NPROC ranks)
  STEPS            fine-tune optimizer steps (default: 4)
  MAX_LENGTH       fine-tune sequence length (default: 64)

Exit status: 0 when every stage passed, else the exit code of the stage that failed
(2 for a bad argument or setting).

Examples:
  ./$PROG
  SKIP_UNIT_TESTS=1 MODEL_PATH=/models/DeepSeek-V2-Lite NPROC=8 TP_SIZE=8 ./$PROG
  UNIT_TESTS="tests/test_layers.py -x" PYTHON=~/venvs/npu/bin/python ./$PROG
EOF
}

die() {
    echo "$PROG: $1" >&2
    exit 2
}

for arg in "$@"; do
    case $arg in
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $arg (settings are environment variables, see --help)" ;;
    esac
done

# ---- settings (relative paths are taken from the caller's directory, before the cd) ----
abs() {
    case $1 in
        /*) printf '%s\n' "$1" ;;
        */*) printf '%s/%s\n' "$(cd "$(dirname "$1")" && pwd)" "$(basename "$1")" ;;
        *) printf '%s\n' "$1" ;;
    esac
}

if [[ -n ${PYTHON:-} ]]; then
    PY=$(command -v "$PYTHON") || die "PYTHON=$PYTHON is not an executable"
elif [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
    PY=$VIRTUAL_ENV/bin/python
else
    PY=$(command -v python3 || command -v python) || die "no python found: install python3 or set PYTHON"
fi
PY=$(abs "$PY")  # not resolved through symlinks: a venv's python must stay the venv's
PY_BIN=$(dirname "$PY")

for var in NPROC STEPS MAX_LENGTH TP_SIZE; do
    value=${!var:-}
    [[ -z $value || $value =~ ^[1-9][0-9]*$ ]] || die "$var=$value is not a positive integer"
done
NPROC=${NPROC:-2}
STEPS=${STEPS:-4}
MAX_LENGTH=${MAX_LENGTH:-64}
TP_SIZE=${TP_SIZE:-}
MODEL_PATH=${MODEL_PATH:-}
if [[ -n $MODEL_PATH ]]; then
    [[ -d $MODEL_PATH ]] || die "MODEL_PATH=$MODEL_PATH is not a directory"
    MODEL_PATH=$(cd "$MODEL_PATH" && pwd)
fi
UNIT_TESTS=${UNIT_TESTS:-tests}
SKIP_UNIT_TESTS=${SKIP_UNIT_TESTS:-0}

if [[ -n ${LOG_DIR:-} ]]; then
    mkdir -p "$LOG_DIR" || die "cannot create LOG_DIR=$LOG_DIR"
    LOG_DIR=$(cd "$LOG_DIR" && pwd)
else
    LOG_DIR=$ROOT/logs/remote-test-$(date +%Y%m%d-%H%M%S)
    mkdir -p "$LOG_DIR" || die "cannot create $LOG_DIR"
fi

cd "$ROOT"
export PYTHONUNBUFFERED=1  # output reaches the console and the logs as it happens, in order

# Console scripts of the chosen interpreter, else the same module through it (never another env's).
if [[ -x $PY_BIN/npu-parallel ]]; then ENV_CMD=("$PY_BIN/npu-parallel" env); else ENV_CMD=("$PY" -m npu_parallel env); fi
if [[ -x $PY_BIN/torchrun ]]; then TORCHRUN=("$PY_BIN/torchrun"); else TORCHRUN=("$PY" -m torch.distributed.run); fi

DEVICE_FILE=$LOG_DIR/device.txt

show() {  # print a command, then run it
    echo "\$ $*"
    "$@"
}

# ---- stages: each runs with its output piped to the console and its log; its status is the stage's ----

stage_environment() {
    echo "date:    $(date '+%Y-%m-%d %H:%M:%S %z')"
    echo "host:    $(hostname 2>/dev/null || uname -n)"
    echo "project: $ROOT"
    echo "python:  $PY ($("$PY" --version 2>&1))"
    echo "settings: NPROC=$NPROC TP_SIZE=${TP_SIZE:-<all ranks>} STEPS=$STEPS MAX_LENGTH=$MAX_LENGTH" \
        "MODEL_PATH=${MODEL_PATH:-<tiny model>} UNIT_TESTS=$UNIT_TESTS SKIP_UNIT_TESTS=$SKIP_UNIT_TESTS"
    "$PY" - "$DEVICE_FILE" <<'EOF' || return
import sys

try:
    import torch
except Exception as e:
    print(f"torch: cannot import ({type(e).__name__}: {e})")
    if "torch_npu" in str(e):  # torch's backend entry point imports torch_npu, which needs CANN's libraries
        print("torch_npu is installed but CANN is not sourced:"
              " source /usr/local/Ascend/ascend-toolkit/set_env.sh (your CANN toolkit's set_env.sh) first")
    else:
        print("hint: install torch (on Ascend: the torch / torch_npu pair that matches the CANN toolkit)")
    sys.exit(1)
print(f"torch: {torch.__version__}")

device, count, name = "cpu", 0, ""
try:
    import torch_npu
except ModuleNotFoundError as e:
    if e.name != "torch_npu":
        print(f"torch_npu: installed but import failed ({e})")
    else:
        print("torch_npu: not installed")
except Exception as e:  # typically the CANN libraries are not on the library path
    print(f"torch_npu: installed but import failed ({type(e).__name__}: {e})")
    print("torch_npu is installed but CANN is not sourced:"
          " source /usr/local/Ascend/ascend-toolkit/set_env.sh (your CANN toolkit's set_env.sh) first")
else:
    print(f"torch_npu: {getattr(torch_npu, '__version__', 'unknown version')}")
    try:
        print(f"CANN: {torch_npu.npu.utils.get_cann_version()}")
    except Exception as e:  # older torch_npu releases have no get_cann_version
        print(f"CANN: unknown ({type(e).__name__})")
    try:
        if torch.npu.is_available():
            device, count = "npu", torch.npu.device_count()
            name = torch.npu.get_device_name(0)
    except Exception as e:
        print(f"torch.npu: not usable ({type(e).__name__}: {e})")
if device == "cpu" and torch.cuda.is_available():
    device, count, name = "cuda", torch.cuda.device_count(), torch.cuda.get_device_name(0)

if device == "cpu":
    print("device: cpu (no NPU or GPU visible; stages 4-5 run on the CPU with gloo)")
else:
    print(f"device: {device}")
    print(f"device count: {count}" + (f" ({name})" if name else ""))
with open(sys.argv[1], "w") as f:
    f.write(f"{device} {count}\n")
EOF
    if [[ -e /usr/local/Ascend && -z ${ASCEND_TOOLKIT_HOME:-} && -z ${ASCEND_HOME_PATH:-} ]]; then
        echo "hint: /usr/local/Ascend exists but the CANN environment is not loaded:" \
            "source /usr/local/Ascend/ascend-toolkit/set_env.sh"
    fi
    local rc=0
    show "${ENV_CMD[@]}" || rc=$?
    if [[ $rc -ne 0 ]]; then
        # Not installed yet is stage 2's to report, with its hint; any other failure is this stage's.
        "$PY" -c "import npu_parallel" >/dev/null 2>&1 && return "$rc"
        echo "(npu-parallel env failed: npu_parallel cannot be imported; stage 2 says why)"
    fi
    if command -v npu-smi >/dev/null 2>&1; then
        show npu-smi info || echo "(npu-smi info failed with exit code $?)"
    fi
    echo "HCCL_* / ASCEND_* variables set:"
    local names
    names=$(compgen -e | grep -E '^(HCCL|ASCEND)_' | sort || true)
    if [[ -z $names ]]; then
        echo "  (none)"
    else
        while IFS= read -r var; do
            printf '  %s=%s\n' "$var" "${!var}"
        done <<<"$names"
    fi
}

stage_install() {
    # From a neutral directory: the examples import npu_parallel from wherever it is installed,
    # which must be this project (pip install -e .), not a stale copy somewhere else.
    (cd / && "$PY" - "$ROOT" <<'EOF')
import os
import sys

root = os.path.realpath(sys.argv[1])
try:
    import npu_parallel
except Exception as e:
    print(f"import npu_parallel failed: {type(e).__name__}: {e}")
    print(f"hint: cd {root} && pip install -e '.[npu]'    (without an NPU: pip install -e '.[test]')")
    sys.exit(1)
where = os.path.realpath(os.path.dirname(npu_parallel.__file__))
print(f"npu_parallel {npu_parallel.__version__} imported from {where}")
if where != os.path.join(root, "npu_parallel"):
    print(f"that is not this project ({root}): the examples would run the other copy")
    print(f"hint: cd {root} && pip install -e '.[npu]'")
    sys.exit(1)
EOF
}

stage_unit_tests() {
    if ! "$PY" -c "import pytest" >/dev/null 2>&1; then
        echo "pytest is not installed for $PY: pip install -e '.[test]' (or SKIP_UNIT_TESTS=1)"
        return 1
    fi
    local -a targets
    read -ra targets <<<"$UNIT_TESTS"
    show "$PY" -m pytest -q "${targets[@]}"
}

stage_conversion() {
    # a kernel that silently falls back to the CPU fails the smoke stages instead of only slowing them
    export TORCH_NPU_FALLBACK_CPU_DISABLE=1
    local script=examples/test_deepseek_moe.py
    if [[ ! -f $script ]]; then
        echo "$script not found in $ROOT: sync the whole project (./sync_to_remote.sh)"
        return 2
    fi
    show "$PY" "$script" ${MODEL_PATH:+--model_path "$MODEL_PATH"}
}

stage_finetune() {
    export TORCH_NPU_FALLBACK_CPU_DISABLE=1
    local script=examples/train_deepseek_v2_lite.py device=cpu count=0
    if [[ ! -f $script ]]; then
        echo "$script not found in $ROOT: sync the whole project (./sync_to_remote.sh)"
        return 2
    fi
    [[ -s $DEVICE_FILE ]] && read -r device count <"$DEVICE_FILE"
    if [[ $device != cpu && $NPROC -gt $count ]]; then
        echo "NPROC=$NPROC but only $count $device device(s) are visible: set NPROC=$count or fewer"
        return 2
    fi
    show "${TORCHRUN[@]}" --standalone --nproc_per_node "$NPROC" "$script" \
        --steps "$STEPS" --max_length "$MAX_LENGTH" --log_dir "$LOG_DIR/train" \
        ${MODEL_PATH:+--model_path "$MODEL_PATH"} ${TP_SIZE:+--tp_size "$TP_SIZE"}
}

# ---- driver ----

NAMES=("environment" "install check" "unit tests" "conversion smoke test" "short fine-tune")
FUNCS=(stage_environment stage_install stage_unit_tests stage_conversion stage_finetune)
LOGS=(1-environment.log 2-install-check.log 3-unit-tests.log 4-conversion.log 5-finetune.log)
RESULTS=("not run" "not run" "not run" "not run" "not run")

summary() {
    {
        echo
        echo "summary ($(date '+%Y-%m-%d %H:%M:%S'), logs in $LOG_DIR):"
        local i
        for i in "${!NAMES[@]}"; do
            printf '  [%d/5] %-22s %s\n' $((i + 1)) "${NAMES[i]}" "${RESULTS[i]}"
        done
    } | tee "$LOG_DIR/summary.txt"
}

echo "$PROG: project $ROOT, python $PY, logs in $LOG_DIR"
for i in "${!NAMES[@]}"; do
    n=$((i + 1))
    name=${NAMES[i]}
    log=$LOG_DIR/${LOGS[i]}
    echo
    if [[ $n -eq 3 && ${SKIP_UNIT_TESTS,,} =~ ^(1|true|yes)$ ]]; then
        printf '[%d/5] %s\nskipped (SKIP_UNIT_TESTS=%s)\n' "$n" "$name" "$SKIP_UNIT_TESTS" | tee "$log"
        RESULTS[i]="skipped (SKIP_UNIT_TESTS=$SKIP_UNIT_TESTS)"
        continue
    fi
    start=$SECONDS
    set +e
    { echo "[$n/5] $name"; "${FUNCS[i]}"; } 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    elapsed=$((SECONDS - start))
    if [[ $rc -ne 0 ]]; then
        RESULTS[i]="FAILED (exit code $rc, ${elapsed}s)"
        summary
        echo "FAILED at stage $n ($name): exit code $rc; log: $log"
        exit "$rc"
    fi
    RESULTS[i]="ok (${elapsed}s)"
done
summary
echo "All stages passed; logs in $LOG_DIR"
