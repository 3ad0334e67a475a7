"""``npu-parallel generate MODEL --tp N --prompt TEXT``: text from a converted model, the same on every rank.

MODEL is a Hugging Face folder or an npu-parallel sharded checkpoint (a training step folder); the ranks start as
``verify``'s do (in this process at tp 1, in place inside torchrun, else launched). Sampling (``--temperature``,
``--top_p``) agrees across the ranks and equals the unconverted model's under ``--seed``
(npu_parallel.convert.generation). ``--chat`` renders each prompt as a user turn with the tokenizer's chat template.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from npu_parallel.tools.checks import UserError
from npu_parallel.tools.cli_common import checkpoint_errors, parse_dtype, ranks_failed
from npu_parallel.training.errors import EXIT_OK


def _tokenizer_dir(model: Path, tokenizer: str | None) -> Path:
    """``--tokenizer``, else MODEL, else (a sharded checkpoint) the Hugging Face folder its manifest names."""
    if tokenizer:
        return Path(tokenizer)
    manifest = model / "manifest.json"
    if manifest.is_file():
        recorded = json.loads(manifest.read_text()).get("source_path")
        if recorded and any(Path(recorded).glob("tokenizer*")):
            return Path(recorded)
    return model


def load_tokenizer(folder: Path, chat: bool):
    """The tokenizer (a UserError naming the fix when it is missing, or has no chat template under --chat)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"no tokenizer in {folder} ({str(exc).splitlines()[0][:120]}); pass --tokenizer DIR (a folder with "
            f"tokenizer.json)"
        ) from None
    if chat and not getattr(tok, "chat_template", None):
        raise UserError(
            f"--chat: the tokenizer in {folder} has no chat template; drop --chat, or pass --tokenizer DIR whose "
            f"tokenizer_config.json (or chat_template.jinja) has one"
        )
    return tok


def encode(tok, prompts: list[str], chat: bool, system: str | None) -> list[list[int]]:
    """Token ids per prompt: plain text, or (``chat``) a user turn rendered with the chat template."""
    if not chat:
        return [tok(p)["input_ids"] for p in prompts]
    out = []
    for p in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out


def generate_on_rank(job: dict) -> list[dict] | None:
    """Load, convert, generate each prompt; rank 0 returns ``[{prompt, ids, text}]``, the others None."""
    import torch

    import npu_parallel
    from npu_parallel.tools.jobs import quiet

    quiet()
    state = npu_parallel.init_distributed(job["tp"], ep_size=job["ep"])
    path = Path(job["path"])
    dtype = parse_dtype(job["dtype"])
    trust = bool(job.get("trust_remote_code")) or None
    if (path / "manifest.json").is_file():
        model = npu_parallel.load_sharded(path, state, dtype=dtype, trust_remote_code=trust)
    else:
        model = npu_parallel.load_pretrained(path, state, dtype=dtype, progress=False, trust_remote_code=trust)
    if job["lora_adapter"]:
        npu_parallel.apply_lora(model, state, job["lora_adapter"])
    model.eval()
    tok = load_tokenizer(Path(job["tokenizer"]), job["chat"])
    options: dict = {"max_new_tokens": job["max_new_tokens"]}
    if job["temperature"] is not None:
        options["do_sample"] = job["temperature"] > 0
        if job["temperature"] > 0:
            options["temperature"] = job["temperature"]
    if job["top_p"] is not None:
        options["top_p"] = job["top_p"]
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        options["pad_token_id"] = tok.eos_token_id
    torch.manual_seed(job["seed"])  # every rank; rank 0's stream is the one sampled from anyway
    results = []
    for prompt, ids in zip(job["prompts"], encode(tok, job["prompts"], job["chat"], job["system"]), strict=True):
        x = torch.tensor([ids], device=state.device)
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), **options)  # type: ignore[operator]
        new = out[0, x.shape[1] :].tolist()
        results.append({"prompt": prompt, "ids": new, "text": tok.decode(new, skip_special_tokens=True)})
    return results if state.rank == 0 else None


@checkpoint_errors
def cmd_generate(args: argparse.Namespace) -> int:
    """Text for each --prompt from the model split over --tp ranks."""
    from npu_parallel.tools.jobs import in_torchrun
    from npu_parallel.tools.launch import launch

    path = Path(args.path)
    if not path.is_dir():
        raise UserError(f"{args.path}: no such folder; pass a Hugging Face folder or an npu-parallel checkpoint")
    if args.ep is not None and (args.ep < args.tp or args.ep % args.tp):
        raise UserError(f"--ep {args.ep}: must be a multiple of --tp {args.tp}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens {args.max_new_tokens}: must be a positive integer")
    if args.temperature is not None and args.temperature < 0:
        raise UserError(f"--temperature {args.temperature}: must be >= 0 (0: greedy)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top_p {args.top_p}: must be in (0, 1]")
    if args.lora_adapter and not (Path(args.lora_adapter) / "adapter_config.json").is_file():
        raise UserError(f"--lora_adapter {args.lora_adapter}: no adapter_config.json there; pass a PEFT adapter folder")
    parse_dtype(args.dtype)
    tok_dir = _tokenizer_dir(path, args.tokenizer)
    load_tokenizer(tok_dir, args.chat)  # bad input before any rank starts
    if not (path / "manifest.json").is_file():
        from npu_parallel.tools.cli_runs import check_tp_sizes

        check_tp_sizes(str(path), [args.tp], "auto")
    world = args.ep or args.tp
    job = {
        "path": str(path),
        "tp": args.tp,
        "ep": args.ep,
        "dtype": args.dtype,
        "lora_adapter": args.lora_adapter,
        "tokenizer": str(tok_dir),
        "chat": args.chat,
        "system": args.system,
        "prompts": args.prompt,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "trust_remote_code": args.trust_remote_code,
    }
    try:
        if in_torchrun() or world == 1:
            if in_torchrun() and int(os.environ["WORLD_SIZE"]) != world:
                raise UserError(f"inside torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}) pass --tp/--ep {world}")
            results = generate_on_rank(job)
        else:
            results = launch("npu_parallel.tools.cli_generate:generate_on_rank", world, job)[0]
    except RuntimeError as exc:
        return ranks_failed("generate", exc)
    if results is None:  # a non-zero rank inside torchrun
        return EXIT_OK
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            print(r["text"])
    return EXIT_OK


def add_generate_parser(sub) -> None:
    """The ``generate`` verb's flags."""
    p = sub.add_parser("generate", help="text from a converted model at any tp/ep (sampling agrees across ranks)")
    p.add_argument("path", help="a Hugging Face folder or an npu-parallel sharded checkpoint")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (>1 launches the ranks with torchrun)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size, a multiple of --tp (default: --tp)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument(
        "--temperature", type=float, default=None, help="0: greedy; > 0: sample (default: generation_config.json)"
    )
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass (default: generation_config)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (rank 0's; default 0)")
    p.add_argument("--chat", action="store_true", help="render each prompt as a user turn with the chat template")
    p.add_argument("--system", default=None, help="with --chat: a system message before the user turn")
    p.add_argument("--lora_adapter", default=None, metavar="DIR", help="a PEFT adapter folder applied on the model")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: MODEL's)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: as stored)")
    p.add_argument("--json", action="store_true", help="one JSON line: prompt, generated ids and text per prompt")
    p.add_argument("--trust_remote_code", action="store_true", help="run the checkpoint's own code (auto_map)")
    p.set_defaults(func=cmd_generate)
