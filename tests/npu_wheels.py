"""torch_npu's own op schemas and meta kernels, read from its released wheels, registered on CPU (no CANN, no install).

:func:`wheel` downloads ``torch_npu==VERSION`` (no dependencies, any platform that has it) into a cache inside
the venv (``<venv>/cache/torch_npu``) once; :func:`registered` defines every ``npu::`` schema of the wheel's
``npu_native_functions_by_codegen.yaml`` with ``torch.library`` and runs the wheel's
``op_plugin/meta/_meta_registrations.py`` against it (its ``torch_npu`` imports served by a shim), so
``torch.ops.npu.<kernel>`` checks argument names, keywords and defaults as that release does and computes
shapes on meta tensors with that release's own meta kernels. Where the schema has the token kernels' ``_grad``
ops (2.6+), their autograd is registered as torch_npu's C++ does it (backward = the ``_grad`` op), so a
backward runs through that release's grad meta kernels; 2.5.1 has none, and gets none.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import subprocess
import sys
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from torch.library import Library

# the oldest release the project supports, the first with autograd for the token kernels, the newest
VERSIONS = ("2.5.1.post1", "2.6.0.post5", "2.14.0")
CACHE = Path(sys.prefix) / "cache" / "torch_npu"
SCHEMAS = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
META = "torch_npu/op_plugin/meta/_meta_registrations.py"
_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64", "manylinux2014_aarch64", "manylinux_2_28_aarch64")


def wheel(version: str) -> Path:
    """The cached wheel of ``torch_npu==version``, downloaded on first use; RuntimeError saying why if it cannot be."""
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob(f"torch_npu-{version}-*.whl"))
    if found:
        return found[0]
    errors = []
    for python in dict.fromkeys((f"{sys.version_info[0]}.{sys.version_info[1]}", "3.11", "3.10")):
        cmd = [sys.executable, "-m", "pip", "download", f"torch_npu=={version}", "--no-deps", "--only-binary=:all:"]
        cmd += [a for p in _PLATFORMS for a in ("--platform", p)]
        cmd += ["--python-version", python, "-d", str(CACHE), "-q"]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            errors.append(f"python {python}: timed out")
            continue
        found = sorted(CACHE.glob(f"torch_npu-{version}-*.whl"))
        if found:
            return found[0]
        errors.append(f"python {python}: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
    raise RuntimeError(f"cannot download torch_npu=={version} from the package registry: {'; '.join(errors)}")


def read(path: Path) -> tuple[list[str], str]:
    """The ``npu::`` schema strings and the meta registration source of one wheel."""
    with zipfile.ZipFile(path) as zf:
        schemas = yaml.safe_load(zf.read(SCHEMAS))
        meta = zf.read(META).decode()
    funcs = []
    for section in ("custom", "quant"):  # "supported"/"autograd" list aten ops, "symint" repeats custom ones
        funcs += [entry["func"] for entry in schemas.get(section) or [] if isinstance(entry, dict) and "func" in entry]
    return funcs, meta


# the fused dense kernels (npu_parallel/parallel/kernels.py) and the fp32 weight-gradient kernel (moe/npu_ops.py)
FUSED = ("npu_swiglu", "npu_rms_norm", "npu_rotary_mul", "npu_fusion_attention", "npu_grouped_matmul_add_")


# strings of the release's libtorch_npu.so: its eager kernels' own rules, which no schema or meta kernel states
LIBRARY = "torch_npu/lib/libtorch_npu.so"
BINARY_FACTS = {
    "eager_rejects_group_type_2": b"group_type currently only support -1 and 0",
    "permute_backward": b"NpuMoeTokenPermuteBackward0",
    "unpermute_backward": b"NpuMoeTokenUnpermuteBackward0",
}


def binary_facts(path: Path) -> dict[str, bool]:
    """Which of :data:`BINARY_FACTS` the wheel's ``libtorch_npu.so`` contains (cached beside the wheel)."""
    cache = path.with_suffix(".facts.json")
    if cache.exists():
        facts = json.loads(cache.read_text())
        if set(facts) == set(BINARY_FACTS):
            return facts
    with zipfile.ZipFile(path) as zf:
        data = zf.read(LIBRARY)
    facts = {name: marker in data for name, marker in BINARY_FACTS.items()}
    cache.write_text(json.dumps(facts))
    return facts


class _Anything(types.ModuleType):
    """A stand-in for a torch_npu module or constant the meta kernels only compare or format."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        return ""  # ops_error(...) -> "", ErrCode.VALUE(...) never called


def _shim_torch_npu() -> dict[str, types.ModuleType]:
    root = _Anything("torch_npu")
    # torch_npu's own dtypes are enum values the meta kernels compare against (never a real input here)
    for name, code in (("int4", 285), ("hifloat8", 290), ("float8_e8m0fnu", 293), ("float4_e2m1fn_x2", 296)):
        setattr(root, name, code)
    root.float4_e1m2fn_x2 = 297
    utils = types.ModuleType("torch_npu.npu.utils")
    utils.get_cann_version = lambda *a, **k: "8.5.0"  # type: ignore[attr-defined]
    utils._is_gte_cann_version = lambda *a, **k: True  # type: ignore[attr-defined]
    backends = types.ModuleType("torch_npu.npu._backends")
    backends.get_soc_version = lambda: 220  # type: ignore[attr-defined]  # Atlas A2 (910B)
    npu = _Anything("torch_npu.npu")
    npu.utils, npu._backends = utils, backends
    root.npu = npu
    errors = types.ModuleType("torch_npu.utils._error_code")
    errors.ErrCode = _Anything("ErrCode")  # type: ignore[attr-defined]
    errors.ops_error = lambda *a, **k: ""  # type: ignore[attr-defined]
    return {"torch_npu": root, "torch_npu.utils._error_code": errors, "torch_npu.npu.utils": utils,
            "torch_npu.npu._backends": backends, "torch_npu.npu": npu}  # fmt: skip


class _Permute(torch.autograd.Function):
    """torch_npu's autograd for the permute (2.6+): the backward is its ``npu_moe_token_permute_grad``."""

    @staticmethod
    def forward(ctx, tokens, indices, num_out_tokens, padded_mode):
        with torch._C._AutoDispatchBelowAutograd():
            permuted, sorted_indices = torch.ops.npu.npu_moe_token_permute(tokens, indices, num_out_tokens, padded_mode)
        ctx.save_for_backward(tokens, indices, sorted_indices)
        ctx.padded_mode = padded_mode
        ctx.mark_non_differentiable(sorted_indices)
        return permuted, sorted_indices

    @staticmethod
    def backward(ctx, grad_permuted, _grad_sorted):
        tokens, indices, sorted_indices = ctx.saved_tensors
        grad = torch.ops.npu.npu_moe_token_permute_grad(tokens, grad_permuted, indices, sorted_indices, ctx.padded_mode)
        return grad, None, None, None


class _Unpermute(torch.autograd.Function):
    """torch_npu's autograd for the unpermute (2.6+): the backward is its ``npu_moe_token_unpermute_grad``."""

    @staticmethod
    def forward(ctx, permuted_tokens, sorted_indices, probs, padded_mode, restore_shape):
        with torch._C._AutoDispatchBelowAutograd():
            out = torch.ops.npu.npu_moe_token_unpermute(
                permuted_tokens, sorted_indices, probs, padded_mode, restore_shape
            )
        ctx.save_for_backward(permuted_tokens, sorted_indices, probs)
        ctx.rest = (padded_mode, restore_shape)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        permuted_tokens, sorted_indices, probs = ctx.saved_tensors
        grad_permuted, grad_probs = torch.ops.npu.npu_moe_token_unpermute_grad(
            permuted_tokens, grad_out, sorted_indices, probs, *ctx.rest
        )
        return grad_permuted, None, grad_probs if probs is not None else None, None, None


def _autograd_kernels(lib: Library, defined: set[str]) -> bool:
    """Register the release's autograd for the token kernels where its schema has their _grad ops."""
    if not {"npu_moe_token_permute_grad", "npu_moe_token_unpermute_grad"} <= defined:
        return False  # 2.5.1: PyTorch's autograd fallback, as on the device (a warning, no gradient)

    def permute(tokens, indices, num_out_tokens=None, padded_mode=False):
        return _Permute.apply(tokens, indices, num_out_tokens, padded_mode)

    def unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
        return _Unpermute.apply(permuted_tokens, sorted_indices, probs, padded_mode, restore_shape)

    lib.impl("npu_moe_token_permute", permute, "Autograd")
    lib.impl("npu_moe_token_unpermute", unpermute, "Autograd")
    return True


class Release(types.SimpleNamespace):
    """One release registered: ``ops`` (a torch_npu-like module of ``torch.ops.npu`` kernels), what was defined."""


@contextlib.contextmanager
def registered(version: str, path: Path) -> Iterator[Release]:
    """Define the wheel's ``npu::`` schemas and Meta kernels in this process for the duration of the block."""
    funcs, meta = read(path)
    libs = [Library("npu", "DEF")]
    defined, meta_ok, meta_failed = set(), set(), {}
    for func in funcs:
        name = func.split("(", 1)[0]
        if name in defined:
            continue
        try:
            libs[0].define(func)
            defined.add(name)
        except Exception:  # a schema this torch cannot parse: not one of ours (the tests name what they need)
            pass
    impl_lib = Library("npu", "IMPL", "Meta")
    libs.append(impl_lib)

    def shim_library(ns, kind, key=""):
        return impl_lib if (ns, kind, key) == ("npu", "IMPL", "Meta") else None  # aten Meta overrides: dropped

    def shim_impl(lib, name, *args, **kwargs):
        def register(fn):
            if lib is impl_lib:
                try:
                    impl_lib.impl(name, fn)
                    meta_ok.add(name)
                except Exception as exc:  # a kernel whose schema is in another yaml (atb, ...)
                    meta_failed[name] = str(exc).splitlines()[0]
            return fn

        return register

    fakes = _shim_torch_npu()

    def shim_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name.split(".")[0] == "torch_npu":
            return fakes.get(name, fakes["torch_npu"]) if fromlist else fakes["torch_npu"]
        module = builtins.__import__(name, globals, locals, fromlist, level)
        if name == "torch.library" and fromlist:
            module = types.SimpleNamespace(Library=shim_library, impl=shim_impl)
        return module

    scope = {"__name__": f"torch_npu_{version}_meta", "__builtins__": {**vars(builtins), "__import__": shim_import}}
    try:
        exec(compile(meta, f"torch_npu-{version}/{META}", "exec"), scope)
        libs.append(Library("npu", "IMPL"))
        token_autograd = _autograd_kernels(libs[-1], defined)
        names = ("npu_moe_token_permute", "npu_moe_token_unpermute", "npu_grouped_matmul", *FUSED)
        ops = types.SimpleNamespace(
            __version__=version, **{n: getattr(torch.ops.npu, n) for n in names if n in defined}
        )
        yield Release(version=version, ops=ops, defined=defined, meta=meta_ok, meta_failed=meta_failed,
                      token_autograd=token_autograd)  # fmt: skip
    finally:
        for lib in reversed(libs):
            lib._destroy()
