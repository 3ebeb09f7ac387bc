"""The settings idiom: a dataclass's fields become flags; values are checked when it is built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from lora_dist.errors import ConfigError
from lora_dist.settings import OneLineParser, Options, add_flags, from_args, option


@dataclass
class Example(Options):
    """A settings class with one field of every kind."""

    model: Path = option(aliases=("--base",))
    """the base model"""
    lora_r: int = option(8, minimum=1, aliases=("-r",))
    """LoRA rank"""
    dropout: float = option(0.0, minimum=0, below=1)
    """dropout probability"""
    dtype: Literal["bf16", "fp32"] | None = None
    """weight dtype"""
    checkpointing: bool = option(True, aliases=("--recompute",))
    """recompute activations"""
    merged: bool = False
    """merge first"""

    def validate(self) -> None:
        if self.merged and self.dtype == "bf16":
            raise ConfigError("--merged needs fp32")


def parse(*argv: str) -> Example:
    parser = OneLineParser(prog="example")
    add_flags(parser, Example)
    return from_args(Example, parser.parse_args(argv))


def test_flags_defaults_and_spellings() -> None:
    assert parse("--model", "m") == Example(Path("m"))
    assert parse("--base", "m", "-r", "4", "--no-checkpointing") == Example(
        Path("m"), lora_r=4, checkpointing=False
    )
    assert parse("--model", "m", "--lora-r", "2", "--no_recompute").checkpointing is False
    assert parse("--model", "m", "--no_checkpointing", "--checkpointing").checkpointing is True
    assert parse("--model", "m", "--dtype", "bf16").dtype == "bf16"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lora_r": 0}, "--lora_r must be at least 1, got 0"),
        ({"dropout": 1.0}, "--dropout must be less than 1"),
        ({"lora_r": "8"}, "--lora_r must be int"),
        ({"lora_r": True}, "--lora_r must be int"),
        ({"dtype": "fp8"}, "--dtype 'fp8' is not one of: bf16, fp32"),
        ({"model": None}, "--model is required"),
        ({"merged": True, "dtype": "bf16"}, "--merged needs fp32"),
    ],
)
def test_bad_values_are_refused_when_built(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Example(**{"model": Path("m"), **kwargs})
    assert message in str(info.value)


def test_help_has_every_docstring_and_default(capsys) -> None:
    parser = OneLineParser(prog="example")
    add_flags(parser, Example)
    text = " ".join(parser.format_help().split())
    for fragment in (
        "--model MODEL the base model (required)",
        "--lora_r LORA_R LoRA rank [default: 8]",
        "--checkpointing recompute activations [default: True]",
        "--no_checkpointing the opposite of --checkpointing",
        "--merged merge first",
    ):
        assert fragment in text
    assert "--base" not in text and "--lora-r" not in text  # aliases work but are not shown


def test_a_field_without_a_docstring_is_a_bug() -> None:
    @dataclass
    class Undocumented(Options):
        x: int = 1

    with pytest.raises(TypeError, match="no docstring"):
        add_flags(OneLineParser(prog="u"), Undocumented)


def test_parser_errors_are_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        parse("--model", "m", "--dtype", "fp8")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("example: error: argument --dtype")
