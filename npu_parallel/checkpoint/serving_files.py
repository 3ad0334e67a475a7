"""What a merged folder needs beside its weights to serve as it is (vLLM, SGLang, transformers' pipeline).

``end_of_turn_ids(tokenizer, template)`` finds the token that closes an assistant turn of a chat template (it
renders a two-turn conversation and reads the first special token after the assistant's text: ``<|im_end|>``,
``<|eot_id|>``, ...). ``write_serving_files(folder, config, ...)`` writes, into a merge's ``.partial`` folder
that already holds the copied tokenizer files: the chat template a training run used (``chat_template.jinja``,
the tokenizer_config's own entry dropped so that nothing contradicts it) and ``generation_config.json`` whose
``eos_token_id`` includes the end of turn and whose ``pad_token_id`` is set (vLLM stops only on those ids).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from npu_parallel.checkpoint.manifest import GENERATION_CONFIG, is_tokenizer_file

logger = logging.getLogger(__name__)

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
_MARK = "npu-parallel-assistant-text"  # rendered as the assistant's reply; what follows it closes the turn


def load_tokenizer(folder: Path) -> Any | None:
    """AutoTokenizer of ``folder``, or None when it holds no tokenizer that loads."""
    if not any(is_tokenizer_file(p.name) for p in folder.iterdir()):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        logger.debug("tokenizer in %s does not load: %s", folder, exc)
        return None


def chat_template_of(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def end_of_turn_ids(tokenizer: Any, template: str | None = None) -> list[int]:
    """The special token(s) right after the assistant's text in ``template`` (default: the tokenizer's)."""
    template = template or chat_template_of(tokenizer)
    if not template:
        return []
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception as exc:
        logger.debug("chat template does not render a user/assistant pair: %s", exc)
        return []
    if not isinstance(text, str) or _MARK not in text:
        return []
    tail = text.split(_MARK, 1)[1]
    if not tail.strip():
        return []
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    first = next((i for i in ids if tokenizer.decode([i]).strip()), None)
    return [first] if first is not None and first in special else []


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def generation_config(config: dict, existing: dict | None, tokenizer: Any, template: str | None) -> dict:
    """generation_config.json's values: ``existing`` (or the model config's bos/eos/pad) with the end of turn
    added to ``eos_token_id`` and ``pad_token_id`` set."""
    out = dict(existing) if existing else {}
    if not existing:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if config.get(key) is not None:
                out[key] = config[key]
    eos = _ids(out.get("eos_token_id"))
    if tokenizer is not None:
        eos += [i for i in _ids(tokenizer.eos_token_id) if i not in eos]
        eos += [i for i in end_of_turn_ids(tokenizer, template) if i not in eos]
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if out.get("pad_token_id") is None:
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        pad = pad if pad is not None else config.get("pad_token_id")
        if pad is not None or eos:
            out["pad_token_id"] = pad if pad is not None else eos[0]
    return out


def write_template(folder: Path, template: str) -> None:
    """``template`` as the folder's chat template: chat_template.jinja, and no other in tokenizer_config.json."""
    (folder / TEMPLATE_FILE).write_text(template)
    (folder / "chat_template.json").unlink(missing_ok=True)
    cfg_path = folder / TOKENIZER_CONFIG
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if cfg.pop("chat_template", None) is not None:
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def write_serving_files(
    folder: Path, config: dict, *, template: str | None, tokenizer_from: Path | None, write_generation: bool = True
) -> dict:
    """Write the chat template (when ``template`` differs from the tokenizer's) and generation_config.json into
    ``folder``; returns what was done, for the merge marker. ``tokenizer_from``: where the tokenizer lies (the
    folder itself, or a user's tokenizer already in the output)."""
    tok = load_tokenizer(tokenizer_from) if tokenizer_from is not None else None
    done: dict = {"chat_template": None, "end_of_turn_ids": [], "generation_config": None}
    if tok is not None:
        own = chat_template_of(tok)
        if template and template != own and tokenizer_from == folder:
            write_template(folder, template)
            done["chat_template"] = "training"
        elif own:
            done["chat_template"] = "tokenizer"
        done["end_of_turn_ids"] = end_of_turn_ids(tok, template or own)
    if not write_generation:
        done["generation_config"] = "kept"
        return done
    path = folder / GENERATION_CONFIG
    existing = json.loads(path.read_text()) if path.is_file() else None
    values = generation_config(config, existing, tok, template)
    if values != existing:
        path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
        done["generation_config"] = "written" if existing is None else "updated"
    else:
        done["generation_config"] = "copied"
    done["eos_token_id"] = values.get("eos_token_id")
    done["pad_token_id"] = values.get("pad_token_id")
    return done
