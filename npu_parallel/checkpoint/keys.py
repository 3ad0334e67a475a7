"""Memory names <-> checkpoint keys, both directions in one place (as torchtitan's ``state_dict_adapter``).

A converted model holds its routed experts fused: ``...experts.gate_up_proj`` ([E, 2I, H], gate rows then
up rows) and ``...experts.down_proj`` ([E, H, I]). Checkpoints store them under those names or per expert
(``...experts.N.gate_proj.weight``, with the family's own (gate, up, down) names), and some families rename
modules on disk (Mixtral: ``.mlp.`` in memory, ``.block_sparse_moe.`` in checkpoints). The HF source reads
through this map and ``merge`` writes through it, so the two directions cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from npu_parallel.convert.plan import Plan

FUSED_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class KeyMap:
    """One family's key mapping: (memory, checkpoint) name fragments and the per-expert (gate, up, down) names."""

    aliases: tuple[tuple[str, str], ...] = ()
    expert_names: tuple[str, str, str] = DEFAULT_EXPERT_NAMES

    @classmethod
    def from_plan(cls, plan: Plan) -> KeyMap:
        return cls(tuple(plan.checkpoint_aliases), tuple(plan.expert_key_names))  # type: ignore[arg-type]

    @classmethod
    def from_manifest(cls, manifest: dict) -> KeyMap:
        """The map a sharded checkpoint recorded (``key_aliases``, ``expert_layout``) for writing HF keys back."""
        layout = manifest.get("expert_layout") or {}
        names = layout.get("names") if layout.get("kind") == "per_expert" else None
        aliases = tuple((str(mem), str(ck)) for mem, ck in manifest.get("key_aliases") or ())
        return cls(aliases, tuple(names) if names else DEFAULT_EXPERT_NAMES)

    def to_checkpoint(self, name: str) -> str:
        """The checkpoint key of memory name ``name`` (aliases applied)."""
        for mem, ck in self.aliases:
            name = name.replace(mem, ck, 1)
        return name

    def candidates(self, name: str) -> list[str]:
        """Keys that may hold ``name`` in a checkpoint: its own, then the aliased one (both exist in the wild)."""
        return list(dict.fromkeys((name, self.to_checkpoint(name))))

    def expert_parts(self, name: str) -> tuple[str, ...] | None:
        """Per-expert module names whose rows stack, in this order, into fused tensor ``name``; None otherwise."""
        prefix, _, leaf = name.rpartition(".")
        if leaf not in FUSED_EXPERT_PARAMS or not prefix.endswith("experts"):
            return None
        gate, up, down = self.expert_names
        return (gate, up) if leaf == FUSED_EXPERT_PARAMS[0] else (down,)

    def expert_keys(self, name: str, expert: int) -> list[str]:
        """Checkpoint keys of expert ``expert``'s rows of fused tensor ``name`` (a checkpoint-side name)."""
        prefix = name.rpartition(".")[0]
        return [f"{prefix}.{expert}.{part}.weight" for part in self.expert_parts(name) or ()]

    def expert_layout(self, keys) -> dict | None:
        """How ``keys`` (a checkpoint's) store routed experts: {"kind": "fused"}, per-expert with names, or None."""
        for key in keys:
            head, sep, _ = key.rpartition(".experts.")
            if not sep or ".experts." in head:
                continue
            fused = f"{head}.experts.{FUSED_EXPERT_PARAMS[0]}"
            if fused in keys:
                return {"kind": "fused"}
            if self.expert_keys(fused, 0)[0] in keys:
                return {"kind": "per_expert", "names": list(self.expert_names)}
        return None
