"""Vetted chat templates for the families npu_parallel supports, for tokenizers that ship none or one that cannot
mark assistant spans. Each renders every turn the same way alone and inside a longer conversation (what
render-and-tokenize labelling needs) and closes each assistant turn with its end-of-turn token."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Builtin:
    """A built-in template: its jinja ``source``, the token closing an assistant turn (None: the tokenizer's EOS)
    and the families it is the published format of."""

    name: str
    source: str
    end_of_turn: str | None
    families: str


_DEEPSEEK_CHAT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

_DEEPSEEK_V3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' and message.get('reasoning_content') %}"
    "{{ '<think>\\n' + message['reasoning_content'].strip() + '\\n</think>\\n\\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_MIXTRAL = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin("deepseek_v2", _DEEPSEEK_CHAT, None, "DeepSeek-V2 / V2-Lite chat"),
        Builtin("deepseek_moe", _DEEPSEEK_CHAT, None, "DeepSeek-MoE 16B chat"),
        Builtin("deepseek_v3", _DEEPSEEK_V3, None, "DeepSeek-V3 / R1 (no tool calls)"),
        Builtin("chatml", _CHATML, "<|im_end|>", "Qwen2/Qwen2-MoE chatml"),
        Builtin("qwen", _CHATML, "<|im_end|>", "Qwen chatml (alias of chatml)"),
        Builtin("qwen3", _CHATML, "<|im_end|>", "Qwen3 / Qwen3-MoE (reasoning_content in <think> tags)"),
        Builtin("mixtral", _MIXTRAL, None, "Mixtral-Instruct [INST] (system folded into the first user turn)"),
    )
}
