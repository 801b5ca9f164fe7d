"""README's "CLI reference" against the real parsers: every flag it documents exists on that subcommand, and every
flag of every subcommand is documented (so the two cannot drift apart). Also `isoconv models` against its block."""
import argparse
import re
from pathlib import Path

from isoconv.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SECTION = "## CLI reference"
FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")


def reference_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    return text[start:text.index("\n## ", start + len(SECTION))]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def real_flags(parser: argparse.ArgumentParser, group: str = None) -> set[str]:
    """The visible long flags of a parser (or of one of its argument groups)."""
    actions = parser._actions if group is None else next(
        g for g in parser._action_groups if g.title == group)._group_actions
    return {o for a in actions if a.help != argparse.SUPPRESS for o in a.option_strings
            if o.startswith("--") and o != "--help"}


def documented() -> tuple[dict[str, set[str]], dict[str, set[str]], set[str]]:
    """(flags per subcommand from the command lines, flags per group of the training-flags table, top-level)."""
    section = reference_section()
    block = re.search(r"^```\n(.*?)^```", section, flags=re.S | re.M).group(1)
    per_command: dict[str, set[str]] = {}
    top: set[str] = set()
    command = None
    for line in block.splitlines():
        usage = re.split(r"\s{3,}", line.strip())[0]  # the right-hand column is explanation
        if line.startswith("isoconv [--debug]"):
            top |= set(FLAG.findall(usage))
            command = None
        elif line.startswith("isoconv "):
            command = line.split()[1]
            per_command.setdefault(command, set()).update(FLAG.findall(usage))
        elif line.startswith(" ") and line.strip().startswith("[") and command:  # a continuation of flags
            per_command[command] |= set(FLAG.findall(usage))
        elif not line.startswith(" "):
            command = None  # torchrun ...
    groups = {}
    for row in re.findall(r"^\| (\w+) \| `(.*)` \|$", section, flags=re.M):
        groups[row[0]] = set(FLAG.findall(row[1]))
    return per_command, groups, top


def test_every_subcommand_and_flag_is_documented_and_exists():
    per_command, groups, top = documented()
    section = reference_section()
    subs = subparsers()
    assert set(per_command) == set(subs), f"documented {sorted(per_command)} vs real {sorted(subs)}"
    assert top == real_flags(build_parser()) - {"--help"}
    setting_groups = ("model", "data", "optimisation", "augmentation", "engine", "runtime")
    assert set(groups) == set(setting_groups)
    train = subs["train"]
    for group in setting_groups:  # the table is the train parser's argument groups, flag for flag
        assert groups[group] == real_flags(train, group), group
    for name, parser in subs.items():
        lines = [line for line in section.splitlines() if line.startswith(f"isoconv {name}")]
        takes_training_flags = any("[training flags]" in line for line in lines)
        doc = per_command[name] | (set().union(*groups.values()) if takes_training_flags else set())
        real = real_flags(parser)
        assert not doc - real, f"isoconv {name}: documented but not accepted: {sorted(doc - real)}"
        assert not real - doc, f"isoconv {name}: accepted but not documented: {sorted(real - doc)}"


def test_models_block_is_the_command_output(capsys):
    from isoconv.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    text = (REPO / "README.md").read_text()
    start = text.index("`isoconv models` prints")
    block = re.search(r"```text\n(.*?)```", text[start:], flags=re.S).group(1)
    assert block == out
