"""The `twin` command line: a thin shell over the stage functions.

Each stage keeps its commands beside its code (`pipeline/cli.py`, `trainer/cli.py`,
`deploy/commands.py`); this module only assembles them and turns expected failures into one
line on stderr and exit status 2.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click
import typer

from deploy import backup as backup_cli
from deploy import commands as deploy_cli
from deploy import doctor
from deploy import memory as memory_cli
from pipeline import cli as pipeline_cli
from pipeline.errors import TwinError
from pipeline.files import is_disk_full
from trainer import cli as trainer_cli

# peft reads transformers' deprecated `is_gradient_checkpointing` on every adapter load: library
# noise a user cannot act on (peft's code, not theirs), printed in the middle of a run.
warnings.filterwarnings("ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning)

app = typer.Typer(
    name="twin",
    help="qq-twin: your QQ chat history → a fine-tuned digital twin → a QQ bot.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """qq-twin: your QQ chat history → a fine-tuned digital twin → a QQ bot."""


for stage in (pipeline_cli, trainer_cli, deploy_cli, backup_cli, doctor, memory_cli):
    app.add_typer(stage.commands)

EXIT_BAD_INPUT = 2

# Recent typer vendors its own copy of click: catch both families of exceptions.
_ABORTS = (click.exceptions.Abort, typer.Abort)
_EXITS = (click.exceptions.Exit, typer.Exit)
_USAGE_ERRORS = (click.exceptions.ClickException, typer.exceptions.TyperException)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `twin` console script."""
    command = typer.main.get_command(app)
    try:
        # Without standalone mode typer *returns* the code of `typer.Exit` (130 for Ctrl-C).
        result = command.main(args=argv, prog_name="twin", standalone_mode=False)
    except TwinError as exc:
        print(f"twin: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        if not is_disk_full(exc, exc.filename or Path.cwd()):
            raise
        # Outputs are written under temporary names, so a full disk leaves no half-written result.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"twin: error: {where}no space left on device; the output was not written", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _ABORTS:
        print("twin: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("twin: interrupted", file=sys.stderr)
        return 130
    except _EXITS as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except _USAGE_ERRORS as exc:
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            print(f"twin: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", EXIT_BAD_INPUT) or EXIT_BAD_INPUT)
    if isinstance(result, int) and result != 0:
        if result == 130:
            print("twin: interrupted", file=sys.stderr)
        return result
    return 0


if __name__ == "__main__":
    sys.exit(main())
