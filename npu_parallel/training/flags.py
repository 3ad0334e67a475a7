"""One flag spelling for every command line: ``--max_length`` (as the training flags and the seed scripts write
them), with ``--max-length`` accepted as an alias and never shown in ``--help``."""

from __future__ import annotations

import argparse
from typing import Any


def spellings(flag: str) -> tuple[str, str | None]:
    """(the shown spelling, the hidden alias) of a long option; no alias for short or single-word options."""
    if not flag.startswith("--") or flag.startswith("--_"):
        return flag, None
    shown = "--" + flag[2:].replace("-", "_")
    alias = "--" + flag[2:].replace("_", "-")
    return shown, (alias if alias != shown else None)


class AliasHelpFormatter(argparse.HelpFormatter):
    """Help that lists each option under its shown spelling only."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = [s for s in action.option_strings if s not in getattr(action, "aliases", ())]
        if not shown:
            return super()._format_action_invocation(action)
        kept, action.option_strings = action.option_strings, shown
        try:
            return super()._format_action_invocation(action)
        finally:
            action.option_strings = kept


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser where every long option takes both spellings (underscores shown, hyphens an alias)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", AliasHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        flags, aliases = [], []
        for name in names:
            shown, alias = spellings(name)
            flags.append(shown)
            if alias is not None:
                aliases.append(alias)
        if aliases and "dest" not in kwargs and flags[0].startswith("--"):
            kwargs["dest"] = flags[0][2:]
        if isinstance(kwargs.get("action"), type) and issubclass(kwargs["action"], argparse.BooleanOptionalAction):
            aliases = []  # it adds its own --no-x; the hyphenated form of such a flag is not offered
        action = super().add_argument(*flags, *aliases, **kwargs)
        action.aliases = tuple(aliases)  # type: ignore[attr-defined]
        return action
