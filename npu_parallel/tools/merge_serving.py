"""What ``npu-parallel merge`` adds for serving: the training run's chat template, a PEFT adapter folded into the
weights (``--lora_adapter``), and the serving check of the folder it wrote."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from npu_parallel.checkpoint.manifest import MANIFEST
from npu_parallel.tools.checks import UserError


def recorded_template(manifest: dict) -> str | None:
    """The ``template`` a training run's config named (manifest ``training.extra.config.template``), if any."""
    config = (((manifest.get("training") or {}).get("extra") or {}).get("config")) or {}
    spec = config.get("template") if isinstance(config, dict) else None
    return spec if isinstance(spec, str) and spec else None


def _tokenizer(folder: Path | None) -> Any:
    from npu_parallel.checkpoint.serving_files import load_tokenizer

    return load_tokenizer(folder) if folder is not None and folder.is_dir() else None


def training_template(src: Path, tokenizer_dir: str | None, override: str | None) -> str | None:
    """The Jinja source of the chat template the merged folder gets: ``--chat_template FILE``, else the one the
    training run used (a built-in name or a .jinja file, as ``training.templates.resolve_template`` reads it),
    else None (the tokenizer's own stays)."""
    if override:
        path = Path(override)
        if not path.is_file():
            raise UserError(f"--chat_template {override}: no such file; pass a .jinja chat template")
        return path.read_text(encoding="utf-8")
    from npu_parallel.checkpoint.sharded_source import ShardedSource

    if not (src / MANIFEST).is_file():  # a Hugging Face folder (merge --lora_adapter): its tokenizer's own
        return None
    manifest = ShardedSource(src).manifest
    spec = recorded_template(manifest)
    if spec is None:
        return None
    folder = Path(tokenizer_dir) if tokenizer_dir else Path(str(manifest.get("source_path") or src))
    from npu_parallel.training.templates import resolve_template

    try:  # a built-in name or a .jinja file, as training resolved it
        return resolve_template(spec, _tokenizer(folder)).source
    except ValueError as exc:
        raise UserError(
            f"the run's chat template {spec!r}: {str(exc).splitlines()[0]}; pass --chat_template FILE.jinja"
        ) from None


def merge_with_adapter(src: Path, adapter: str, out: Path, **merge_kwargs: Any) -> Path:
    """``src`` (a sharded checkpoint or a Hugging Face folder) with the PEFT adapter folder ``adapter`` folded into
    its weights, merged into ``out``. One process; the run's manifest extra (dtype, template) carries over."""
    from npu_parallel.checkpoint.load import load_pretrained, load_sharded
    from npu_parallel.checkpoint.offline import merge_checkpoint
    from npu_parallel.checkpoint.peft_adapter import apply_lora
    from npu_parallel.checkpoint.save import save_sharded
    from npu_parallel.checkpoint.sharded_source import ShardedSource
    from npu_parallel.convert.lora import merge_lora
    from npu_parallel.parallel.state import single_rank_state

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"--lora_adapter {adapter}: no adapter_config.json there; pass a PEFT adapter folder")
    state = single_rank_state()
    extra = None
    if (src / MANIFEST).is_file():
        extra = (ShardedSource(src).manifest.get("training") or {}).get("extra")
        model = load_sharded(src, state)
    else:
        model = load_pretrained(src, state, progress=False)
    apply_lora(model, state, adapter)
    merge_lora(model)
    with tempfile.TemporaryDirectory(prefix="npu-parallel-merge-adapter-") as tmp:
        folded = save_sharded(model, Path(tmp) / "tp1", state, extra=extra)
        return merge_checkpoint(folded, out, **merge_kwargs)


def serving_lines(out: Path) -> list[str]:
    """The serving check's problems in ``out`` (empty: ready), one line each, for merge's output."""
    from npu_parallel.checkpoint.serving_check import serving_report

    return [
        f"serving {f['level']}: {f['what']}" + (f" (fix: {f['fix']})" if f["fix"] else "")
        for f in serving_report(out)
        if f["level"] != "ok"
    ]
