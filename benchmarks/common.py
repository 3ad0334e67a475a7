"""What every training benchmark shares: the model spec, alternating launches, step timing, peak memory, results.

A benchmark script adds its own flags to :func:`parser`, resolves ``--model`` with :func:`resolve_model` (``tiny``:
the tiny DeepSeek-V2-Lite-shaped model, a smoke run; ``slice``: the V2-Lite slice of ``slice.py`` at the
published widths, what claims rest on; or a checkpoint folder), runs its worker over alternating launches with
:func:`alternate`, keeps each mode's best launch with :func:`best`, and writes its raw tables with
:func:`write_results` to ``benchmarks/results/<name>.md``, its ratios stated by :func:`ratio` and
:func:`ratio_line`. Workers time steps with :func:`timed_steps` and read
peak memory with :class:`Peak`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


# ---------------------------------------------------------------------------------------------- flags and model
def parser(doc: str, *, steps: int = 10, warmup: int = 2, batch: int = 4, seq: int = 256, repeats: int = 3):
    """An ArgumentParser with the shared flags: --model and the slice's shape, steps, batch, repeats, workdir."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny (smoke run), slice (V2-Lite widths) or a checkpoint folder")
    p.add_argument("--slice_layers", type=int, default=2, help="decoder layers of --model slice (2-4)")
    p.add_argument("--slice_vocab", type=int, default=8192, help="vocabulary of --model slice (real: 102400)")
    p.add_argument("--slice_experts", type=int, default=64, help="routed experts of --model slice (real: 64)")
    p.add_argument("--steps", type=int, default=steps, help=f"timed steps (default {steps})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed steps first (default {warmup})")
    p.add_argument("--batch", type=int, default=batch, help=f"sequences per step and dp rank (default {batch})")
    p.add_argument("--seq", type=int, default=seq, help=f"tokens per sequence (default {seq})")
    p.add_argument("--repeats", type=int, default=repeats, help="alternating launches per mode; the best is kept")
    p.add_argument(
        "--workdir", default=None, help="where models are built and reused (default: /tmp/npu_parallel_bench)"
    )
    return add_results_flag(p)


def add_results_flag(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``p`` with --no_results (print only), for a script with a parser of its own; :func:`parser` has it."""
    p.add_argument("--no_results", action="store_true", help="print only; do not write benchmarks/results/")
    return p


def resolve_model(args: argparse.Namespace) -> tuple[Path, str]:
    """(checkpoint folder, one-line description) for ``args.model``; tiny and slice are built once under workdir."""
    work = Path(args.workdir or "/tmp/npu_parallel_bench")
    work.mkdir(parents=True, exist_ok=True)
    if args.model == "tiny":
        from npu_parallel.tools.tiny import build_tiny_deepseek_v2_lite

        return build_tiny_deepseek_v2_lite(work / "tiny-deepseek-v2-lite"), "tiny DeepSeek-V2-Lite shape (hidden 128)"
    if args.model == "slice":
        sys.path.insert(0, str(HERE))
        from slice import build_slice

        layers, vocab, experts = args.slice_layers, args.slice_vocab, args.slice_experts
        path = build_slice(work / f"v2lite-slice-{layers}l-{vocab}v-{experts}e", layers, vocab, experts)
        cut = "" if experts == 64 else f", routed experts cut to {experts} (real 64)"
        return path, f"DeepSeek-V2-Lite slice ({layers} layers, hidden 2048, vocab {vocab}{cut})"
    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {args.model!r}: expected tiny, slice or a folder with a config.json")
    return path, str(path)


def launch_modes(
    target: str, args: argparse.Namespace, modes: Iterable[str], world: Callable[[str], int] | None = None
) -> tuple[str, list[dict]]:
    """(the model's description, the rank records): ``--model`` resolved, then ``target`` over alternating launches
    of ``modes`` (``world(mode)`` ranks, default ``args.tp``), each given ``args`` with ``mode`` and ``path``."""
    path, desc = resolve_model(args)
    records = alternate(
        target,
        modes,
        args.repeats,
        world or (lambda m: args.tp),
        lambda m: argparse.Namespace(**vars(args), mode=m, path=str(path)),
    )
    return desc, records


def training_model(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(state, model, optimizer, precision) of one rank as the trainer builds them: ``init_distributed(args.tp)``,
    ``args.path`` loaded by ``load_pretrained`` in ``args.precision``'s master dtype, ``data_parallel`` (FSDP2 and
    the precision policy, also at dp 1) and the trainer's AdamW."""
    import torch

    import npu_parallel
    from npu_parallel.parallel.data_parallel import resolve_precision
    from npu_parallel.training.optim import build_optimizer

    torch.set_num_threads(1)
    state = npu_parallel.init_distributed(args.tp)
    mode = resolve_precision(args.precision, state.device.type)
    model = npu_parallel.load_pretrained(args.path, state, dtype=mode.master, progress=False).train()
    npu_parallel.data_parallel(model, state, precision=mode)
    return state, model, build_optimizer(model, 1e-5), mode


# ---------------------------------------------------------------------------------------------- memory
def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss_bytes() -> int:
    """This process's resident set (Linux)."""
    return _status("VmRSS")


class Peak:
    """Peak memory above a baseline: the device's peak allocation on an accelerator, else RSS's high-water mark."""

    def __init__(self, device: Any = None):
        import torch

        kind = getattr(device, "type", "cpu")
        self.accel = getattr(torch, kind, None) if kind not in ("cpu", "meta") else None
        self.kind = "device" if self.accel is not None else "RSS"
        self.reset()

    def reset(self) -> None:
        """Start counting from now (VmHWM reset to the current RSS through /proc/self/clear_refs)."""
        if self.accel is not None:
            self.accel.reset_peak_memory_stats()
            self.base = self.accel.memory_allocated()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.base = rss_bytes()

    def bytes(self) -> int:
        """Peak since :meth:`reset`, above the baseline then."""
        if self.accel is not None:
            return self.accel.max_memory_allocated() - self.base
        return _status("VmHWM") - self.base


# ---------------------------------------------------------------------------------------------- steps
def random_batches(vocab: int, batch: int, seq: int, n: int, seed: int = 0) -> list:
    """``n`` random ``[batch, seq]`` id tensors, the same for a seed everywhere."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def timed_steps(step: Callable[[Any], Any], batches: Iterable, warmup: int, barrier: bool = True) -> tuple[list, list]:
    """Run ``step(batch)`` over ``batches``; (seconds of each step after ``warmup``, their return values)."""
    import torch.distributed as dist

    times, values = [], []
    for i, batch in enumerate(batches):
        if barrier and dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        value = step(batch)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            values.append(value)
    return times, values


# ---------------------------------------------------------------------------------------------- launches
def alternate(
    target: str, modes: Iterable[str], repeats: int, world: Callable[[str], int], make_args: Callable[[str], Any]
) -> list[dict]:
    """``target(make_args(mode))`` on ``world(mode)`` ranks, for every mode in turn, ``repeats`` rounds.

    Alternating spreads background load over the modes alike. Each rank record gets ``mode`` and ``repeat``.
    """
    from npu_parallel.tools.launch import launch

    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    records: list[dict] = []
    for repeat in range(repeats):
        for mode in modes:
            for rank in launch(target, world(mode), make_args(mode), env=env, timeout=3600):
                records.append({**rank, "mode": mode, "repeat": repeat})
    return records


def best(records: list[dict], key: str = "step_s") -> dict[str, list[dict]]:
    """Per mode, the rank records of the launch whose slowest rank had the smallest ``key``."""
    out: dict[str, list[dict]] = {}
    for mode in dict.fromkeys(r["mode"] for r in records):
        runs: dict[int, list[dict]] = {}
        for r in records:
            if r["mode"] == mode:
                runs.setdefault(r["repeat"], []).append(r)
        out[mode] = min(runs.values(), key=lambda rs: max(r[key] for r in rs))
    return out


def spread(records: list[dict], mode: str, key: str = "step_s") -> list[float]:
    """The slowest rank's ``key`` of every launch of ``mode``, sorted (how noisy the machine was)."""
    runs: dict[int, float] = {}
    for r in records:
        if r["mode"] == mode:
            runs[r["repeat"]] = max(runs.get(r["repeat"], 0.0), r[key])
    return sorted(runs.values())


# ---------------------------------------------------------------------------------------------- reports
def machine() -> str:
    """One line: CPU, core count, torch, transformers, load average."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        name = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        cpu = name
    except (OSError, StopIteration):
        pass
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"torch threads {torch.get_num_threads()}, load average {load}"
    )


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def write_report(
    name: str, args: argparse.Namespace, model: str, intro: list[str], header: list[str], rows: list, ratios: list[str]
) -> Path | None:
    """:func:`write_results` of a benchmark's usual body: its ``intro`` lines, the table of ``rows``, its ratios."""
    return write_results(name, args, model, "\n".join([*intro, "", table(header, rows), "", *ratios]))


def write_results(name: str, args: argparse.Namespace, model: str, body: str) -> Path | None:
    """Print ``body``; unless --no_results, write it to benchmarks/results/<name>.md with date, machine, command."""
    print(body)
    if getattr(args, "no_results", False):
        return None
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python", f"benchmarks/{name}.py", *sys.argv[1:]])
    path.write_text(
        f"# {name}\n\n- date: {stamp}\n- machine: {machine()}\n- model: {model}\n- command: `{command}`\n\n{body}\n"
    )
    print(f"wrote {path}")
    return path


def ratio(
    bests: dict[str, list[dict]], key: str, over: str, under: str, pick: Callable[[Iterable[float]], float] = max
) -> float:
    """``key`` of mode ``over`` divided by that of ``under``, each launch taken at its slowest rank: ``pick`` is
    ``max`` for seconds and memory (the default), ``min`` for a rate such as tokens/s."""
    return pick(r[key] for r in bests[over]) / pick(r[key] for r in bests[under])


def ratio_line(
    what: str, value: float, target: tuple[str, float] | None = None, digits: int = 2, unit: str = "x"
) -> str:
    """``ratio WHAT = 1.23x``; with ``target=(">=", 1.0)`` (or ``"<="``) also ``(target >= 1.0x: PASS)`` or MISS."""
    line = f"ratio {what} = {value:.{digits}f}{unit}"
    if target is None:
        return line
    op, bound = target
    if op not in (">=", "<="):
        raise ValueError(f"target {op!r}: use '>=' or '<='")
    met = value >= bound if op == ">=" else value <= bound
    return f"{line} (target {op} {bound}{unit}: {'PASS' if met else 'MISS'})"
