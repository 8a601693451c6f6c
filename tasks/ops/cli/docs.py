"""The CLI reference in the README, generated from the commands' own --help; `llmops cli-reference`."""

from __future__ import annotations

from typing import Any

import typer


def reference_of(root: Any) -> str:
    """The CLI reference in the README, generated from the commands' own --help under `root` (the app's
    click group; a test keeps them equal)."""
    lines: list[str] = []

    def walk(cmd: Any, path: list[str]) -> None:
        if hasattr(cmd, "commands"):  # a group (typer's own click)
            if path and cmd.invoke_without_command:
                emit(cmd, path)
            for name in sorted(cmd.commands):
                sub = cmd.commands[name]
                if not sub.hidden:
                    walk(sub, [*path, name])
            return
        emit(cmd, path)

    def emit(cmd: Any, path: list[str]) -> None:
        args = [p.name.upper() for p in cmd.params if p.param_type_name == "argument"]
        opts = [p.opts[0] for p in cmd.params if p.param_type_name == "option" and p.opts[0] not in
                ("--profile", "--set", "--help")]
        first = (cmd.help or "").strip().split("\n\n")[0].replace("\n", " ")
        lines.append(f"llmops {' '.join(path)}" + "".join(f" {a}" for a in args)
                     + (f" [{' '.join(opts)}]" if opts else ""))
        lines.append(f"    {first}")

    walk(root, [])
    return "\n".join(lines) + "\n"


def cli_reference(ctx: typer.Context) -> None:
    """Print the CLI reference (the README's)."""
    typer.echo(reference_of(ctx.find_root().command), nl=False)
