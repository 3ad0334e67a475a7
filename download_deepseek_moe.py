#!/usr/bin/env python
"""Download a DeepSeek MoE checkpoint from the Hugging Face Hub (or a mirror), check it, and inspect it.

    python download_deepseek_moe.py                                   # DeepSeek-V2-Lite into ./models/...
    python download_deepseek_moe.py --repo_id deepseek-ai/deepseek-moe-16b-base --trust_remote_code
    HF_ENDPOINT=https://hf-mirror.com python download_deepseek_moe.py --include "*.json" "*.safetensors"

huggingface_hub's ``snapshot_download`` does the transfer: an interrupted run resumes where it stopped when run
again (finished files are skipped, partial ones continued). Then every shard the safetensors index names must be
present with a readable header whose tensors fit the file, and ``npu-parallel inspect`` reports what arrived.
Exit codes: 0 done; 1 download failed or incomplete, or the files are broken; 2 bad input (one line).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_REPO = "deepseek-ai/DeepSeek-V2-Lite"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """A mistake in the arguments: one line, exit 2."""


class Failed(Exception):
    """The download or the check failed: one line, exit 1."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo_id", default=DEFAULT_REPO, help=f"model repository (default {DEFAULT_REPO})")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--local_dir", default=None, help="where the files go (default: ./models/REPO_ID)")
    p.add_argument("--include", nargs="+", default=None, metavar="PATTERN", help="only files matching these globs")
    p.add_argument("--exclude", nargs="+", default=None, metavar="PATTERN", help="skip files matching these globs")
    p.add_argument("--endpoint", default=None, help="Hub or mirror URL (default: $HF_ENDPOINT, else the Hub)")
    p.add_argument("--token", default=None, help="access token for gated or private repositories")
    p.add_argument("--max_workers", type=int, default=8, help="files downloaded at once (default 8)")
    p.add_argument("--no_inspect", action="store_true", help="skip `npu-parallel inspect` at the end")
    p.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="passed to inspect (DeepSeek-MoE 16B needs it)",
    )
    args = p.parse_args(argv)
    if args.max_workers < 1:
        raise BadInput(f"--max_workers {args.max_workers}: must be at least 1")
    args.local_dir = Path(args.local_dir or Path("models") / args.repo_id)
    if args.local_dir.exists() and not args.local_dir.is_dir():
        raise BadInput(
            f"--local_dir {args.local_dir}: is a file; pass a folder (new, or an earlier download to resume)"
        )
    return args


def download(args: argparse.Namespace) -> Path:
    """snapshot_download into ``--local_dir``; Hub errors become BadInput (the user's to fix) or Failed."""
    if args.endpoint:  # before huggingface_hub is imported: it reads HF_ENDPOINT once
        os.environ["HF_ENDPOINT"] = args.endpoint.rstrip("/")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    where = f"{args.repo_id} at {endpoint}"
    try:
        path = snapshot_download(
            repo_id=args.repo_id,
            revision=args.revision,
            local_dir=str(args.local_dir),
            allow_patterns=args.include,
            ignore_patterns=args.exclude,
            token=args.token,
            max_workers=args.max_workers,
            endpoint=endpoint,
        )
    except RevisionNotFoundError:
        raise BadInput(f"--revision {args.revision}: no such branch, tag or commit in {where}") from None
    except GatedRepoError:
        raise BadInput(f"{where} is gated: accept its terms on the Hub, then pass --token (or hf auth login)") from None
    except RepositoryNotFoundError:
        raise BadInput(
            f"--repo_id {args.repo_id}: not found at {endpoint} (a typo, or private: pass --token)"
        ) from None
    except LocalEntryNotFoundError as exc:  # the endpoint could not be reached and nothing is cached
        raise Failed(
            f"cannot reach {endpoint} ({str(exc).splitlines()[0]}); check the network, or use a mirror with "
            f"HF_ENDPOINT=https://hf-mirror.com; run again to resume"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise Failed(f"download of {where} stopped: {str(exc).splitlines()[0]}; run again to resume") from None
    return Path(path)


def check_files(folder: Path) -> str:
    """Every shard the index names present, every header readable and within its file: a one-line summary."""
    from npu_parallel.checkpoint.safetensors_io import CheckpointError, read_header

    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise Failed(f"{index}: not a safetensors index ({exc}); delete it and run again") from None
    elif (folder / SINGLE_FILE).is_file():
        weight_map = {}
    else:
        raise Failed(f"{folder}: no {INDEX_FILE} or {SINGLE_FILE} arrived; check --include, or the repository")
    shards = sorted(set(weight_map.values())) or [SINGLE_FILE]
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise Failed(
            f"{len(missing)} of {len(shards)} shards named by {INDEX_FILE} are missing ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); widen --include, or run again to resume"
        )
    tensors = size = 0
    for shard in shards:
        try:
            header = read_header(folder / shard)  # data offsets checked against the file size
        except CheckpointError as exc:
            raise Failed(f"{exc}; delete {shard} and run again to fetch it anew") from None
        absent = [k for k, s in weight_map.items() if s == shard and k not in header]
        if absent:
            raise Failed(f"{folder / shard}: lacks {absent[0]}, which {INDEX_FILE} puts there; delete it, run again")
        tensors += len(header)
        size += (folder / shard).stat().st_size
    if not (folder / "config.json").is_file():
        raise Failed(f"{folder}: config.json did not arrive; add it to --include")
    return f"{len(shards)} safetensors file(s), {tensors} tensors, {size / 1e9:.3f} GB, headers and sizes check out"


def inspect(folder: Path, trust_remote_code: bool) -> int:
    """``npu-parallel inspect`` of the folder, in this interpreter; its exit code."""
    argv = [sys.executable, "-m", "npu_parallel.tools.cli", "inspect", str(folder)]
    return subprocess.call(argv + (["--trust_remote_code"] if trust_remote_code else []))


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        print(f"downloading {args.repo_id} into {args.local_dir} ...", flush=True)
        folder = download(args)
        print(f"checking {folder}: {check_files(folder)}", flush=True)
    except BadInput as exc:
        print(f"download_deepseek_moe.py: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Failed as exc:
        print(f"download_deepseek_moe.py: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if args.no_inspect else inspect(folder, args.trust_remote_code)


if __name__ == "__main__":
    sys.exit(main())
