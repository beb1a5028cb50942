"""The ``pipeline`` command's error output and its root group.

Owns how an error reaches the user (one stderr line, a JSON object under ``--log-format
json``, the ``--summary-json`` error file), the exit-code epilog, and the root group that turns
usage errors into JSON lines. Does not define commands or map the error tree (``cli.py``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click

from .errors import EXIT_CODES, EXIT_USAGE, exit_reason

EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(
    f"  {code}  {name}: {meaning}" for code, (name, meaning) in EXIT_CODES.items()
)


def wants_json(args: list[str]) -> bool:
    """Did the command line ask for JSON logs (errors included)?"""
    return any(
        a == "--log-format=json" or (a == "--log-format" and b == "json")
        for a, b in zip(args, [*args[1:], ""], strict=True)
    )


def json_errors() -> bool:
    ctx = click.get_current_context(silent=True)
    return ctx is not None and (
        ctx.params.get("log_format") == "json" or bool(ctx.find_root().meta.get("json_errors"))
    )


def error_line(message: str, code: int) -> str:
    if json_errors():
        return json.dumps(
            {
                "ts": round(time.time(), 3),
                "event": "error",
                "message": message,
                "exit_code": code,
                "exit_reason": exit_reason(code),
            },
            ensure_ascii=False,
        )
    return f"pipeline: error: {message}"


def fail(message: str, code: int, summary_json: str | None = None) -> NoReturn:
    """One line on stderr (a JSON object under --log-format json), then exit ``code``.

    With --summary-json the file gets ``{"exit_code", "exit_reason", "error"}``, so a cron
    job reads why nothing ran from the same place as a run's figures."""
    click.echo(error_line(message, code), err=True)
    if summary_json:
        write_json(
            summary_json,
            {"exit_code": code, "exit_reason": exit_reason(code), "error": message},
        )
    sys.exit(code)


class MainGroup(click.Group):
    """The command group; with --log-format json its usage errors are JSON lines too."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        ctx = super().make_context(info_name, args, parent, **extra)
        ctx.meta["json_errors"] = wants_json(args)
        return ctx

    def main(self, args: Any = None, *rest: Any, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if not wants_json(argv) or extra.get("standalone_mode") is False:
            return super().main(argv, *rest, **extra)
        extra["standalone_mode"] = False
        try:
            code = super().main(argv, *rest, **extra)
        except click.ClickException as exc:
            click.echo(
                json.dumps(
                    {
                        "ts": round(time.time(), 3),
                        "event": "error",
                        "message": exc.format_message(),
                        "exit_code": EXIT_USAGE,
                        "exit_reason": exit_reason(EXIT_USAGE),
                    }
                ),
                err=True,
            )
            sys.exit(EXIT_USAGE)
        except click.exceptions.Abort:
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def write_json(path: str, data: dict[str, Any]) -> None:
    try:
        Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        click.echo(
            error_line(f"--summary-json: {os_error_message(exc, Path(path))}", EXIT_USAGE),
            err=True,
        )


def os_error_message(exc: OSError, path: Path) -> str:
    where = exc.filename or path
    what = exc.strerror or type(exc).__name__
    return f"cannot write {where} ({what}). Choose a writable place for -o, or fix its permissions."
