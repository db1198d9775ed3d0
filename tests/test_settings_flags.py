"""Flags generated from a settings model: one declaration per knob, the CLI follows it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import typer
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from pipeline.settings_flags import Flag, settings_flags


class Inner(BaseModel):
    enabled: bool = Field(False, description="turn the inner pass on")
    model: str = Field("qwen3", description="which model")


class Knobs(BaseModel):
    gap: int = Field(120, ge=0, description="seconds between bursts")
    style: Literal["a", "b"] = Field("a", description="a | b")
    mix: str = Field("", description="a path kept as text")
    inner: Inner = Field(default_factory=Inner)


def _app(received: list[dict[str, Any]]) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @settings_flags(
        Knobs, "gap", "style", Flag("mix", path=True), Flag("inner.enabled", "--inner"), "inner.model"
    )
    def run(name: str, overrides: dict[str, Any] | None = None) -> None:
        received.append(overrides or {})

    return app


def test_a_flag_takes_its_type_and_help_from_the_field():
    result = CliRunner().invoke(_app([]), ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag, help in [
        ("--gap", "seconds between bursts"),
        ("--style", "a | b"),
        ("--mix", "a path kept as text"),
        ("--inner", "turn the inner pass on"),
        ("--model", "which model"),
    ]:
        assert flag in result.output and help in result.output
    bad = CliRunner().invoke(_app([]), ["x", "--gap", "many"])
    assert bad.exit_code == 2 and "--gap" in bad.output


def test_only_the_flags_given_reach_the_command_nested_by_table():
    received: list[dict[str, Any]] = []
    app = _app(received)
    assert CliRunner().invoke(app, ["x"]).exit_code == 0
    assert (
        CliRunner().invoke(app, ["x", "--gap", "5", "--mix", "m.jsonl", "--inner", "--model", "m"]).exit_code
        == 0
    )
    assert received == [{}, {"gap": 5, "mix": str(Path("m.jsonl")), "inner": {"enabled": True, "model": "m"}}]
