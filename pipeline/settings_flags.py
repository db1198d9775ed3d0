"""Command-line flags made from a settings model's fields, as LLaMA-Factory's `HfArgumentParser` does.

A knob is declared once, on its pydantic settings class (type, description); `@settings_flags`
turns the fields a command names into typer options with that type and that help. Each flag
defaults to None ("not given"), so the config file's value, or the field's default, stays.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from pydantic import BaseModel

Command = TypeVar("Command", bound=Callable[..., Any])

OVERRIDES = "overrides"  # the command parameter that the generated flags replace


@dataclass(frozen=True, slots=True)
class Flag:
    """One settings field as a flag: `field` is `"burst_gap"`, or `"llm.model"` in a nested table.

    `name` where the flag is not `--` + the field's name (`"--llm-clean"`, or `"--qlora/--no-qlora"`
    for a switch that can also turn a setting off); `short` (`"-o"`) and `envvar` where it has one.
    """

    field: str
    name: str | None = None
    short: str | None = None
    envvar: str | None = None
    path: bool = False  # a path the settings keep as str (`"mix"`, `"llm.cache"`): shown and parsed as one

    @property
    def parameter(self) -> str:
        """The Python name of the flag's parameter: `--llm-clean` → `llm_clean`."""
        flag = self.name or "--" + self.field.rpartition(".")[2]
        return flag.split("/")[0].removeprefix("--").replace("-", "_")


def settings_flags(model: type[BaseModel], *fields: str | Flag) -> Callable[[Command], Command]:
    """Replace the command's `overrides` parameter by one option per field, in the order given.

    The command is called with the flags the user gave in `overrides`, nested by table as
    the model takes them: `{"burst_gap": 60, "llm": {"model": "qwen3"}}`.
    """
    flags = [field if isinstance(field, Flag) else Flag(field) for field in fields]

    def decorate(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        generated = [_parameter(model, flag) for flag in flags]
        parameters: list[inspect.Parameter] = []
        for parameter in signature.parameters.values():
            parameters.extend(generated if parameter.name == OVERRIDES else [parameter])
        if len(parameters) == len(signature.parameters):
            raise TypeError(f"{command.__name__} has no `{OVERRIDES}` parameter for the settings flags")

        def run(**kwargs: Any) -> Any:
            given = {flag: kwargs.pop(flag.parameter) for flag in flags}
            return command(**kwargs, **{OVERRIDES: _nested(given)})

        run.__name__, run.__qualname__ = command.__name__, command.__qualname__
        run.__doc__, run.__module__ = command.__doc__, command.__module__
        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        return typing.cast(Command, run)

    return decorate


def _parameter(model: type[BaseModel], flag: Flag) -> inspect.Parameter:
    """The typer option of one field: its type (Optional and Literal as the plain value) and help."""
    owner, name = model, flag.field
    while "." in name:
        table, _, name = name.partition(".")
        owner = owner.model_fields[table].annotation  # a nested settings model
    field = owner.model_fields[name]
    kind = Path if flag.path else _plain(field.annotation)
    decls = [flag.name or "--" + name.replace("_", "-"), *([flag.short] if flag.short else [])]
    if kind is bool and "/" not in decls[0]:
        # An on-switch: left off, it keeps the file's value rather than forcing False.
        annotation, default = bool, False
    else:
        annotation, default = kind | None, None
    option = typer.Option(*decls, help=field.description, envvar=flag.envvar)
    return inspect.Parameter(
        flag.parameter,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=default,
        annotation=Annotated[annotation, option],
    )


def _plain(annotation: Any) -> type:
    """`int | None` → int; `Literal["a", "b"]` → str (the settings model checks the choice)."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return type(args[0])
    if args and typing.get_origin(annotation) is not list:
        return _plain(args[0])
    return annotation


def _nested(given: dict[Flag, Any]) -> dict[str, Any]:
    """The flags given (a switch left off is not given), nested by table."""
    overrides: dict[str, Any] = {}
    for flag, value in given.items():
        if value is None or (value is False and "/" not in (flag.name or "")):
            continue
        *tables, key = flag.field.split(".")
        target = overrides
        for table in tables:
            target = target.setdefault(table, {})
        target[key] = str(value) if flag.path else value
    return overrides
