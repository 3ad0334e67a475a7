#!/usr/bin/env bash
# Copy this project (the folder this script lives in) to a server with rsync, without the
# virtualenv, caches, build outputs, runs, logs or checkpoints. See --help.
set -euo pipefail

PROG=$(basename "$0")
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)

usage() {
    cat <<EOF
Usage: $PROG [--host H] [--dir D] [--user U] [--port P] [--dry-run] [--delete] [--exclude PATTERN]...

Copy this project ($SRC) to HOST:DIR with rsync, then run
./test_moe_on_remote.sh there.

Options (each wins over its environment variable):
  --host H          target host                  (REMOTE_HOST); empty or "local": DIR is a local directory
  --dir D           target directory             (REMOTE_DIR, required); relative paths and '~/...'
                    are relative to the remote home directory; created if missing
  --user U          ssh user                     (REMOTE_USER, optional)
  --port P          ssh port                     (SSH_PORT, optional)
  --dry-run         show what would be copied, write nothing (rsync --dry-run)
  --delete          also delete files under DIR that no longer exist here (excluded paths such as
                    .venv, runs/, logs/ and checkpoints on the target are never deleted)
  --exclude PATTERN one more rsync exclude pattern (repeatable)
  -h, --help        show this help

Never copied: .git .venv __pycache__ *.pyc .pytest_cache *.egg-info build/ dist/ runs/ logs/
checkpoints/ ckpt*/ checkpoint*/ *.safetensors *.partial (and .mypy_cache .ruff_cache
.ipynb_checkpoints .DS_Store).

Examples:
  REMOTE_HOST=ascend01 REMOTE_DIR='~/npu_parallel' ./$PROG
  ./$PROG --host 10.0.0.5 --user ma --port 2222 --dir /data/ma/npu_parallel --dry-run
  ./$PROG --dir /tmp/npu_parallel_copy            # local copy, no ssh
EOF
}

die() {
    echo "$PROG: $1" >&2
    exit "${2:-1}"
}

host=${REMOTE_HOST:-}
dir=${REMOTE_DIR:-}
user=${REMOTE_USER:-}
port=${SSH_PORT:-}
dry_run=0
delete=0
extra_excludes=()

need_value() {  # flag, remaining argument count
    [[ $2 -ge 2 ]] || die "$1 needs a value (see --help)" 2
}

while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --host) need_value "$1" $#; host=$2; shift 2 ;;
        --host=*) host=${1#*=}; shift ;;
        --dir) need_value "$1" $#; dir=$2; shift 2 ;;
        --dir=*) dir=${1#*=}; shift ;;
        --user) need_value "$1" $#; user=$2; shift 2 ;;
        --user=*) user=${1#*=}; shift ;;
        --port) need_value "$1" $#; port=$2; shift 2 ;;
        --port=*) port=${1#*=}; shift ;;
        --exclude) need_value "$1" $#; extra_excludes+=("$2"); shift 2 ;;
        --exclude=*) extra_excludes+=("${1#*=}"); shift ;;
        --dry-run | -n) dry_run=1; shift ;;
        --delete) delete=1; shift ;;
        *) die "unknown option: $1 (see --help)" 2 ;;
    esac
done

[[ -n $dir ]] || die "REMOTE_DIR is not set: export REMOTE_DIR=... or pass --dir" 2
[[ -z $port || $port =~ ^[0-9]+$ ]] || die "invalid ssh port: $port" 2
command -v rsync >/dev/null 2>&1 || die "rsync not found: install it (apt-get install rsync / brew install rsync)" 127

# Trailing slashes off (but keep "/"): the target is always "$dir/", the contents of SRC go into it.
while [[ $dir == */ && $dir != / ]]; do dir=${dir%/}; done

# Training outputs and weights stay here; the package's checkpoint/ sub-package and the small checkpoints
# committed as test data travel (rsync: the first matching rule wins, so the include comes first).
includes=('/tests/data/***')
excludes=(
    .git .venv __pycache__ '*.pyc' .pytest_cache '*.egg-info' build/ dist/
    runs/ logs/ checkpoints/ 'ckpt*/' '/checkpoint*/' '*.safetensors' '*.partial'
    .mypy_cache/ .ruff_cache/ .ipynb_checkpoints/ .DS_Store
)
excludes+=("${extra_excludes[@]+"${extra_excludes[@]}"}")

opts=(-a -i)  # -i: one line per changed file (short flags: macOS openrsync has fewer long ones)
for pattern in "${includes[@]}"; do
    opts+=("--include=$pattern")
done
for pattern in "${excludes[@]}"; do
    opts+=("--exclude=$pattern")
done
[[ $dry_run -eq 1 ]] && opts+=(--dry-run)
[[ $delete -eq 1 ]] && opts+=(--delete)

if [[ -z $host || $host == local ]]; then
    # Local target: no ssh. Resolve it to refuse copying the project into itself.
    [[ -z $user && -z $port ]] || echo "note: no host given, so --user/--port (REMOTE_USER/SSH_PORT) are ignored" >&2
    [[ $dir == \~ || $dir == \~/* ]] && dir=$HOME${dir#\~}
    [[ $dir == /* ]] || dir=$PWD/$dir
    existing=$dir rest=""
    while [[ ! -d $existing ]]; do
        rest=/$(basename "$existing")$rest
        existing=$(dirname "$existing")
    done
    base=$(cd "$existing" && pwd -P)
    [[ $base == / ]] && base=""
    resolved=$base$rest
    [[ -n $resolved ]] || resolved=/
    if [[ $resolved == "$SRC" || $resolved == "$SRC"/* ]]; then
        die "target $resolved is inside the project itself ($SRC): choose another REMOTE_DIR" 2
    fi
    target=$resolved/
    shown=$resolved
    [[ $dry_run -eq 1 ]] || mkdir -p "$resolved"
    next="cd $(printf '%q' "$resolved") && ./test_moe_on_remote.sh"
else
    command -v ssh >/dev/null 2>&1 || die "ssh not found: install an OpenSSH client" 127
    # '~/x' means x under the remote home: rsync and the remote shell both start there.
    if [[ $dir == \~ ]]; then dir=.; elif [[ $dir == \~/* ]]; then dir=${dir#\~/}; fi
    login=${user:+$user@}$host
    ssh_cmd=(ssh)
    [[ -n $port ]] && ssh_cmd+=(-p "$port")
    opts+=(-z -e "${ssh_cmd[*]}")
    # rsync only creates the last path component itself: make the parents on the remote side.
    [[ $dry_run -eq 1 ]] || opts+=("--rsync-path=mkdir -p $(printf '%q' "$dir") && rsync")
    target=$login:$dir/
    shown=$login:$dir
    next="${ssh_cmd[*]} $login 'cd $(printf '%q' "$dir") && ./test_moe_on_remote.sh'"
fi

echo "sync: $SRC/ -> $shown/"
echo "excluding: ${excludes[*]}"
if [[ $dry_run -eq 1 ]]; then
    echo "dry run (rsync --dry-run): nothing is written"
fi
[[ $delete -eq 1 ]] && echo "--delete: files under $shown that are not in the project are removed"

status=0
rsync "${opts[@]}" "$SRC/" "$target" || status=$?
if [[ $status -ne 0 ]]; then
    die "rsync failed with exit code $status ($SRC/ -> $shown/)" "$status"
fi

if [[ $dry_run -eq 1 ]]; then
    echo "dry run done: nothing was written; run again without --dry-run to copy"
else
    echo "done: project synced to $shown"
fi
echo "next: $next"
