#!/usr/bin/env python
"""Loading benchmark: peak RSS per rank and wall time of npu_parallel.load_pretrained against the naive
path (full from_pretrained on every rank + convert_model), transformers' own tp_plan="auto", and a plain read
of the same safetensors files.

    .venv/bin/python benchmarks/bench_load.py                 # everything, default 2 layers (~2.2 GB bf16)
    .venv/bin/python benchmarks/bench_load.py --only ours --tp 2

The checkpoint has DeepSeek-V2-Lite's real layer shapes truncated to ``--layers`` layers (layer 0 dense, the
rest MoE) and is built once under ``--workdir`` (reused if present). Every measurement runs ``rank_main`` of this
file in N fresh torchrun ranks (``npu_parallel.tools.launch``); each rank measures itself:

* baseline RSS after imports (transformers' lazily imported DeepSeek-V2 modules included, so that no method
  pays their ~3 s inside its timed window) and ``init_distributed``; then the kernel's high-water mark is reset
  (``echo 5 > /proc/self/clear_refs``) and VmHWM read after the load: peak = VmHWM - baseline VmRSS (exact);
* a sampler *process* (not a thread: it must not wait for the GIL) reads the rank's /proc/PID/status every 5 ms
  and keeps RssAnon/RssFile at the largest VmRSS it saw, to split the peak into anonymous and file-backed
  (mmapped safetensors pages) memory;
* after the load, every parameter byte is read once ("first use"): safetensors 0.8 hands out zero-copy views
  of its mmap, which cost nothing during a load and are only read (and counted in RSS) when first touched.

The page cache cannot be dropped without root, so the files are read once before anything is timed and the
plain-read baseline reads them twice and reports the second (warm) pass; every load is therefore warm-cache.
The whole plan runs ``--repeat`` rounds; the table shows, per method and tp, the round whose slowest rank is
the median, and every round's wall time. Raw per-rank records go to ``<workdir>/results_*/results.jsonl``, the
tables to ``benchmarks/results/bench_load.md`` (not with ``--no_results``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402

MiB = 1 << 20
CHUNK = 64 * MiB

# DeepSeek-V2-Lite (deepseek-ai/DeepSeek-V2-Lite config.json), only num_hidden_layers changed.
V2_LITE = dict(
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_shared_experts=2,
    n_routed_experts=64,
    routed_scaling_factor=1.0,
    kv_lora_rank=512,
    q_lora_rank=None,
    qk_rope_head_dim=64,
    v_head_dim=128,
    qk_nope_head_dim=128,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    num_experts_per_tok=6,
    first_k_dense_replace=1,
    norm_topk_prob=False,
    hidden_act="silu",
    max_position_embeddings=163840,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=100000,
    eos_token_id=100001,
    attention_bias=False,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    },
)

# (key, title) of the printed table
COLUMNS = [
    ("method", "method"),
    ("tp", "tp"),
    ("rank", "rank"),
    ("peak", "peak RSS above base (MiB)"),
    ("anon_file", "at sampled peak: anon/file (MiB)"),
    ("end", "RSS after load (MiB)"),
    ("held", "params held (MiB)"),
    ("share", "ckpt/tp (MiB)"),
    ("mem_ratio", "peak/target"),
    ("wall", "wall (s)"),
    ("walls", "wall, all rounds (s)"),
    ("bytes", "bytes read (MiB)"),
    ("thr", "MiB/s"),
    ("thr_ratio", "vs read x1"),
    ("thr_ratio_n", "vs read xN"),
    ("mem_ok", "mem"),
    ("thr_ok", "speed"),
]


# ---------------------------------------------------------------------------------------------- memory
def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def sampler_main(pid: int, interval: float) -> None:
    """Child process: sample /proc/PID/status until stdin closes, print the largest VmRSS seen and its split."""
    best = {"VmRSS": -1}
    max_anon = max_file = 0
    n = 0
    os.set_blocking(sys.stdin.fileno(), False)
    print("ready", flush=True)
    while True:
        try:
            s = proc_status(pid)
        except (FileNotFoundError, ProcessLookupError):
            break
        n += 1
        if s["VmRSS"] > best["VmRSS"]:
            best = s
        max_anon, max_file = max(max_anon, s["RssAnon"]), max(max_file, s["RssFile"])
        try:
            if os.read(sys.stdin.fileno(), 1) == b"":
                break  # EOF: the rank is done
        except BlockingIOError:
            pass
        time.sleep(interval)
    print(json.dumps({"at_peak": best, "max_anon": max_anon, "max_file": max_file, "samples": n}), flush=True)


class Meter:
    """Baseline RSS, kernel high-water mark reset, and a 5 ms sampler process, around one measured step."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval

    def start(self) -> None:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current VmRSS
        self.base = proc_status()
        if self.base["VmHWM"] > self.base["VmRSS"] + 4 * MiB:
            raise RuntimeError(f"clear_refs did not reset VmHWM: {self.base}")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE),
                "--worker",
                "sampler",
                "--pid",
                str(os.getpid()),
                "--interval",
                str(self.interval),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": ""},
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def stop(self) -> dict:
        end = proc_status()
        self.proc.stdin.close()
        sampled = json.loads(self.proc.stdout.readline())
        self.proc.wait()
        b = self.base
        peak = end["VmHWM"] - b["VmRSS"]
        at = sampled["at_peak"]
        return {
            "base_rss": b["VmRSS"],
            "base_anon": b["RssAnon"],
            "base_file": b["RssFile"],
            "peak": peak,
            "hwm": end["VmHWM"],
            "end_rss": end["VmRSS"] - b["VmRSS"],
            "end_anon": end["RssAnon"] - b["RssAnon"],
            "end_file": end["RssFile"] - b["RssFile"],
            "sampled_peak": at["VmRSS"] - b["VmRSS"],
            "sampled_anon": at["RssAnon"] - b["RssAnon"],
            "sampled_file": at["RssFile"] - b["RssFile"],
            "max_file": sampled["max_file"] - b["RssFile"],
            "max_anon": sampled["max_anon"] - b["RssAnon"],
            "samples": sampled["samples"],
        }


# ---------------------------------------------------------------------------------------------- checkpoint
def ckpt_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def ckpt_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in ckpt_files(path))


def build_main(path: Path, layers: int) -> None:
    """Worker: save DeepSeek-V2-Lite shapes with ``layers`` layers, bf16, to ``path`` (atomically)."""
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV2Config(**V2_LITE, num_hidden_layers=layers, dtype="bfloat16")
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 directly: half the memory and time of fp32
    model = DeepseekV2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    tmp = path.with_name(path.name + ".tmp")
    model.to(torch.bfloat16).save_pretrained(tmp)
    tmp.rename(path)
    print(
        f"built {path} ({ckpt_bytes(path) / 1e9:.2f} GB, {len(ckpt_files(path))} file(s)) "
        f"in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )


def ensure_checkpoint(workdir: Path, layers: int) -> Path:
    path = workdir / f"deepseek_v2_lite_shapes_{layers}l_bf16"
    if (path / "config.json").is_file() and ckpt_files(path):
        print(f"reusing {path} ({ckpt_bytes(path) / 1e9:.2f} GB)", flush=True)
        return path
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, str(HERE), "--worker", "build", "--ckpt", str(path), "--layers", str(layers)], check=True
    )
    return path


def warm_cache(path: Path) -> float:
    t0, buf = time.perf_counter(), bytearray(CHUNK)
    for f in ckpt_files(path):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- rank workers
def read_range_into_memory(path: Path, rank: int, world: int) -> int:
    """Read this rank's 1/world of the checkpoint's bytes (all of them at world=1) into fresh memory."""
    import torch

    files = [(f, f.stat().st_size) for f in ckpt_files(path)]
    total = sum(s for _, s in files)
    lo, hi = total * rank // world, total * (rank + 1) // world
    got, offset = 0, 0
    for f, size in files:
        a, b = max(lo, offset), min(hi, offset + size)
        if a < b:
            buf = torch.empty(b - a, dtype=torch.uint8)  # held until the file is done, like a loaded tensor
            view = memoryview(buf.numpy())
            with open(f, "rb", buffering=0) as fh:
                fh.seek(a - offset)
                pos = 0
                while pos < b - a:
                    n = fh.readinto(view[pos : pos + CHUNK])
                    if not n:
                        raise RuntimeError(f"{f}: short read")
                    pos += n
            got += pos
            del view, buf
        offset += size
    return got


def param_bytes(model) -> int:
    seen, n = set(), 0
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) not in seen and p.device.type != "meta":
            seen.add(id(p))
            local = p.to_local() if hasattr(p, "to_local") else p
            n += local.numel() * local.element_size()
    return n


def touch(model) -> None:
    """Read every byte of every parameter/buffer once, in blocks (no large temporaries, strided views too)."""
    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t = t.to_local() if hasattr(t, "to_local") else t
            if t.device.type == "meta" or t.numel() == 0:
                continue
            if t.dim() == 0:
                t.sum()
                continue
            step = max(1, (8 << 20) // max(1, t[0].numel()))
            for block in t.split(step):
                block.sum()


def mmap_view_bytes(model, path: Path) -> dict:
    """Bytes of parameters whose storage lies inside an mmap of a checkpoint file (contiguous / strided)."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            if str(path) in line:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                ranges.append((lo, hi))
    out = {"contiguous": 0, "strided": 0}
    seen = set()
    for p in model.parameters():
        p = p.to_local() if hasattr(p, "to_local") else p
        if id(p) in seen or p.device.type != "cpu":
            continue
        seen.add(id(p))
        if any(lo <= p.data_ptr() < hi for lo, hi in ranges):
            out["contiguous" if p.is_contiguous() else "strided"] += p.numel() * p.element_size()
    return out


def rank_main(method: str, tp: int, ckpt: str) -> dict:
    """One rank's record of one method: peak and end RSS, wall time, bytes read, first-use cost."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    path = Path(ckpt)
    t_import = time.perf_counter()
    import torch.distributed.tensor
    import transformers.conversion_mapping
    import transformers.core_model_loading
    import transformers.distributed.tensor_parallel  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV2ForCausalLM  # noqa: F401
    from transformers.utils import logging as hf_logging

    import npu_parallel
    from npu_parallel.checkpoint.load import load_pretrained

    # transformers imports lazily: pull in the model's modules (~3 s here) now, so that no method pays them
    # inside its timed window and every RSS baseline includes them
    AutoConfig.from_pretrained(str(path))
    t_import = time.perf_counter() - t_import
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    state = npu_parallel.init_distributed(tp if method != "read" else None, timeout_s=1200)
    rank, world = state.rank, state.world_size
    total = ckpt_bytes(path)
    rec = {
        "method": method,
        "tp": tp,
        "world": world,
        "rank": rank,
        "ckpt_bytes": total,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "import_s": t_import,
    }
    meter = Meter()
    dist.barrier()

    if method == "read":
        # pass 1 (cold or warm, untimed for the comparison), then the measured warm pass 2
        t0 = time.perf_counter()
        read_range_into_memory(path, rank, world)
        rec["pass1_s"] = time.perf_counter() - t0
        gc.collect()
        dist.barrier()
        meter.start()
        dist.barrier()
        t0 = time.perf_counter()
        got = read_range_into_memory(path, rank, world)
        rec["wall"] = rec["load_s"] = time.perf_counter() - t0
        rec.update(meter.stop(), bytes_read=got)
    elif method == "read_st":
        from safetensors.torch import load_file

        files = ckpt_files(path)[rank::world]
        for _ in range(2):  # the second pass is the measured one
            dist.barrier()
            meter.start()
            dist.barrier()
            t0, got = time.perf_counter(), 0
            for f in files:
                # load_file returns zero-copy views of an mmap (safetensors 0.8): clone to really read the bytes
                sd = load_file(str(f))
                for k in list(sd):
                    sd[k] = sd[k].clone()
                    got += sd[k].numel() * sd[k].element_size()
                del sd
            rec["wall"] = rec["load_s"] = time.perf_counter() - t0
            rec.update(meter.stop(), bytes_read=got)
    else:
        meter.start()
        dist.barrier()
        t0 = time.perf_counter()
        try:
            if method == "ours":
                model = load_pretrained(path, state, progress=False)
            elif method == "naive":
                model = AutoModelForCausalLM.from_pretrained(path)
                model = npu_parallel.convert_model(model, state)
            elif method == "hf_tp":
                model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
            else:
                raise ValueError(method)
        except Exception as exc:  # recorded verbatim in the table
            rec["wall"] = time.perf_counter() - t0
            rec.update(meter.stop())
            rec["error"] = f"{type(exc).__name__}: {exc}"
            model = None
        else:
            rec["wall"] = time.perf_counter() - t0
            rec.update(meter.stop())
            # first use: read every parameter byte once (zero-copy mmap views are only read here)
            t1 = time.perf_counter()
            touch(model)
            rec["touch_s"] = time.perf_counter() - t1
            after = proc_status()
            rec.update(
                touch_peak=after["VmHWM"] - rec["base_rss"],
                touch_rss=after["VmRSS"] - rec["base_rss"],
                touch_anon=after["RssAnon"] - rec["base_anon"],
                touch_file=after["RssFile"] - rec["base_file"],
            )
        if model is not None:
            rec["mmap_views"] = mmap_view_bytes(model, path)
            rec["held"] = param_bytes(model)
            rec["dtype"] = str(next(model.parameters()).dtype)
            info = getattr(model, "npu_parallel_conversion", None)  # None: not converted by us
            stats = info.load_stats if info is not None else None
            if stats is not None:
                rec["bytes_read"], rec["load_s"] = stats["bytes_read"], stats["seconds"]
            elif method == "naive":
                rec["bytes_read"], rec["load_s"] = total, rec["wall"]  # every rank materialises every tensor
    if "error" in rec:  # the group may be broken: leave it, so that the launcher does not wait on a barrier
        from npu_parallel.parallel.state import destroy_distributed

        destroy_distributed()
    return rec


# ---------------------------------------------------------------------------------------------- parent
def launch(method: str, nproc: int, tp: int, ckpt: Path, out: Path, timeout: int) -> None:
    """``rank_main`` on ``nproc`` ranks; one JSON record per rank in ``out`` (an error record if the ranks failed)."""
    from npu_parallel.tools.launch import LaunchError
    from npu_parallel.tools.launch import launch as launch_ranks

    print(f"$ bench_load:rank_main on {nproc} rank(s): {method} tp={tp}", flush=True)
    t0, log = time.perf_counter(), out / f"{method}_tp{tp}.log"
    try:
        recs = launch_ranks(
            "bench_load:rank_main", nproc, method, tp, str(ckpt), timeout=timeout, env={"OMP_NUM_THREADS": "1"}
        )
        error = None
    except LaunchError as exc:
        log.write_text(str(exc))
        lines = [ln for text in exc.output.values() for ln in text.splitlines() if "Error" in ln or "error" in ln]
        error, recs = (lines[-1:] or str(exc).splitlines()[:1])[0][:300], []
    status = "ok" if error is None else f"FAILED (log {log})"
    print(f"  -> {status} in {time.perf_counter() - t0:.0f} s", flush=True)
    for r in range(nproc):
        rec = (
            recs[r]
            if recs
            else {
                "method": method,
                "tp": tp,
                "rank": r,
                "ckpt_bytes": ckpt_bytes(ckpt),
                "error": f"ranks failed: {error}",
            }
        )
        (out / f"{method}_tp{tp}_r{r}.json").write_text(json.dumps(rec))


def fmt_row(rec: dict, ref_thr: float | None, ref_thr_n: dict, ratio_target: float, slack: int) -> dict:
    mib = lambda b: f"{b / MiB:.0f}"
    tp = rec["tp"]
    row = {"method": rec["method"], "tp": str(tp), "rank": str(rec["rank"])}
    share = rec["ckpt_bytes"] / tp if rec["method"] not in ("read", "read_st") else rec.get("bytes_read", 0)
    row["share"] = mib(share)
    if "error" in rec:
        row.update({k: "-" for k, _ in COLUMNS if k not in row})
        row["error"] = rec["error"]
        row["mem_ok"] = row["thr_ok"] = "ERROR"
        return row
    target = ratio_target * share + slack * MiB
    row["peak"] = mib(rec["peak"])
    row["anon_file"] = f"{mib(rec['sampled_anon'])}/{mib(rec['sampled_file'])}"
    row["end"] = mib(rec["end_rss"])
    row["held"] = mib(rec["held"]) if "held" in rec else "-"
    row["wall"] = f"{rec['wall']:.2f}"
    row["walls"] = " ".join(f"{w:.1f}" if w is not None else "-" for w in rec.get("walls", []))
    is_base = rec["method"] in ("read", "read_st")
    row["mem_ratio"] = "-" if is_base else f"{rec['peak'] / target:.2f}"
    row["mem_ok"] = "-" if is_base else ("PASS" if rec["peak"] <= target else "MISS")
    if "bytes_read" in rec:
        thr = rec["bytes_read"] / max(rec["load_s"], 1e-9)
        row["bytes"], row["thr"] = mib(rec["bytes_read"]), f"{thr / MiB:.0f}"
        r1 = thr / ref_thr if ref_thr else None
        rn = ref_thr_n.get(rec.get("world", tp))
        row["thr_ratio"] = f"{r1:.2f}" if r1 is not None else "-"
        row["thr_ratio_n"] = f"{thr / rn:.2f}" if rn else "-"
        row["thr_ok"] = "-" if is_base or r1 is None else ("PASS" if r1 >= 0.5 else "MISS")
    else:
        row.update(bytes="n/a", thr="n/a", thr_ratio="n/a", thr_ratio_n="n/a", thr_ok="n/a")
    return row


def table(recs: list[dict], ratio_target: float, slack: int) -> str:
    base = {}
    for r in recs:
        if r["method"] == "read" and "error" not in r:
            base.setdefault(r["world"], []).append(r["bytes_read"] / r["load_s"])
    ref_thr_n = {w: sum(v) / len(v) for w, v in base.items()}  # mean per-rank plain-read throughput at N readers
    ref = ref_thr_n.get(1)
    rows = [fmt_row(r, ref, ref_thr_n, ratio_target, slack) for r in recs]
    widths = {k: max(len(t), *(len(row.get(k, "")) for row in rows)) for k, t in COLUMNS}
    line = lambda cells: "| " + " | ".join(c.ljust(widths[k]) for (k, _), c in zip(COLUMNS, cells, strict=True)) + " |"
    out = [line([t for _, t in COLUMNS]), "|" + "|".join("-" * (widths[k] + 2) for k, _ in COLUMNS) + "|"]
    out += [line([row.get(k, "") for k, _ in COLUMNS]) for row in rows]
    errors = sorted({(row["method"], row["tp"], row["error"]) for row in rows if "error" in row})
    for m, tp, e in errors:
        out.append(f"\n{m} tp={tp} error (verbatim):\n    {e}")
    return "\n".join(out)


TOUCH_COLUMNS = [
    ("method", "method"),
    ("tp", "tp"),
    ("rank", "rank"),
    ("views", "params left as mmap views: contig/strided (MiB)"),
    ("touch_s", "touch all params (s)"),
    ("touch_peak", "peak incl. touch (MiB)"),
    ("touch_af", "RSS after touch: anon/file (MiB)"),
    ("touch_ratio", "peak incl. touch/target"),
]


def touch_table(recs: list[dict], ratio_target: float, slack: int) -> str:
    """What first use costs: every parameter byte read once after the load returned."""
    mib = lambda b: f"{b / MiB:.0f}"
    rows = []
    for r in recs:
        if "touch_s" not in r:
            continue
        target = ratio_target * r["ckpt_bytes"] / r["tp"] + slack * MiB
        v = r.get("mmap_views", {})
        rows.append(
            {
                "method": r["method"],
                "tp": str(r["tp"]),
                "rank": str(r["rank"]),
                "views": f"{mib(v.get('contiguous', 0))}/{mib(v.get('strided', 0))}",
                "touch_s": f"{r['touch_s']:.2f}",
                "touch_peak": mib(r["touch_peak"]),
                "touch_af": f"{mib(r['touch_anon'])}/{mib(r['touch_file'])}",
                "touch_ratio": f"{r['touch_peak'] / target:.2f}",
            }
        )
    if not rows:
        return ""
    widths = {k: max(len(t), *(len(row[k]) for row in rows)) for k, t in TOUCH_COLUMNS}
    line = lambda cells: (
        "| " + " | ".join(c.ljust(widths[k]) for (k, _), c in zip(TOUCH_COLUMNS, cells, strict=True)) + " |"
    )
    out = [line([t for _, t in TOUCH_COLUMNS]), "|" + "|".join("-" * (widths[k] + 2) for k, _ in TOUCH_COLUMNS) + "|"]
    return "\n".join(out + [line([row[k] for k, _ in TOUCH_COLUMNS]) for row in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (1 dense + MoE); 2 = 2.2 GB in bf16")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/npu_parallel_bench"))
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4], help="tensor-parallel sizes for ours")
    ap.add_argument("--naive-tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--hf-tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument(
        "--only",
        nargs="+",
        choices=["read", "read_st", "ours", "naive", "hf_tp"],
        default=["read", "read_st", "ours", "naive", "hf_tp"],
    )
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the median round (by slowest rank) is shown")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per torchrun launch")
    ap.add_argument("--target-ratio", type=float, default=1.15)
    ap.add_argument("--target-slack-mib", type=int, default=200)
    common.add_results_flag(ap)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--interval", type=float, default=0.005, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker == "sampler":
        return sampler_main(args.pid, args.interval)
    if args.worker == "build":
        return build_main(Path(args.ckpt), args.layers)

    import torch
    import transformers

    ckpt = ensure_checkpoint(args.workdir, args.layers)
    out = args.workdir / f"results_{time.strftime('%Y%m%d_%H%M%S')}"
    out.mkdir(parents=True)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPUs; "
        f"checkpoint {ckpt} = {ckpt_bytes(ckpt)} bytes in {len(ckpt_files(ckpt))} file(s)",
        flush=True,
    )
    print(f"page cache warm-up read: {warm_cache(ckpt):.1f} s", flush=True)
    plan = []
    if "read" in args.only:
        plan += [("read", n, n) for n in sorted({1, *args.tp})]
    if "read_st" in args.only:
        plan += [("read_st", 1, 1)]
    if "ours" in args.only:
        plan += [("ours", n, n) for n in args.tp]
    if "naive" in args.only:
        plan += [("naive", n, n) for n in args.naive_tp]
    if "hf_tp" in args.only:
        plan += [("hf_tp", n, n) for n in args.hf_tp]
    for rep in range(args.repeat):  # rounds over the whole plan, so slow drift hits every method alike
        (out / f"rep{rep}").mkdir()
        for method, nproc, tp in plan:
            print(f"[round {rep + 1}/{args.repeat}] load average {os.getloadavg()[0]:.2f}", end="  ", flush=True)
            launch(method, nproc, tp, ckpt, out / f"rep{rep}", args.timeout)
    recs = []
    for method, nproc, tp in plan:
        runs = [
            [json.loads((out / f"rep{rep}" / f"{method}_tp{tp}_r{r}.json").read_text()) for r in range(nproc)]
            for rep in range(args.repeat)
        ]
        # report the round whose slowest rank is the median; keep every round's wall time per rank
        slowest = lambda run: max((x.get("wall", float("inf")) for x in run), default=0)
        chosen = sorted(runs, key=slowest)[(len(runs) - 1) // 2]
        for r, rec in enumerate(chosen):
            rec["walls"] = [run[r].get("wall") for run in runs]
            recs.append(rec)
    with open(out / "results.jsonl", "w") as f:
        for rec in recs:
            f.write(json.dumps(rec) + "\n")
    print()
    body = [
        table(recs, args.target_ratio, args.target_slack_mib),
        "\nAfter the load returned, every parameter read once (first use):\n",
        touch_table(recs, args.target_ratio, args.target_slack_mib),
        f"\nraw records: {out / 'results.jsonl'}",
    ]
    files = len(ckpt_files(ckpt))
    model = f"DeepSeek-V2-Lite shapes, {args.layers} layers, bf16: {ckpt} = {ckpt_bytes(ckpt)} bytes in {files} file(s)"
    common.write_results("bench_load", args, model, "\n".join(body))


if __name__ == "__main__":
    main()
