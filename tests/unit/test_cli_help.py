"""Every `kvroute` option says what it does and what it defaults to (issue 15: no silent
misconfiguration). Walks the parser of `kvroute.cli.build_parser()` and all its subparsers."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvroute.cli import build_parser

# Options whose None default may go unexplained (none: every one says what happens).
_NONE_DEFAULT_UNEXPLAINED: frozenset[tuple[str, str]] = frozenset()


def _parsers(
    parser: argparse.ArgumentParser, prog: str = "kvroute"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(command path, parser) for the parser and every subparser below it, once each."""
    seen: set[int] = set()

    def walk(
        p: argparse.ArgumentParser, path: str
    ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
        if id(p) in seen:  # an alias of a subcommand already walked
            return
        seen.add(id(p))
        yield path, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")

    yield from walk(parser, prog)


def _actions() -> list[tuple[str, argparse.ArgumentParser, argparse.Action]]:
    return [
        (path, parser, action)
        for path, parser in _parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._VersionAction)
    ]


def _name(action: argparse.Action) -> str:
    return (
        action.option_strings[-1] if action.option_strings else str(action.metavar or action.dest)
    )


def _rendered(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help as `parser.format_help()` prints it (its formatter may add to it), without
    the invocation (whose choices would show any default) and with whitespace collapsed."""
    if action.help is None:  # test_every_argument_has_help reports it
        return ""
    return " ".join(parser._get_formatter()._expand_help(action).split())


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0  # store_true/store_false/store_const/count take none


def _shown(default: object) -> list[str]:
    """Ways the default may be written in the help: as argparse prints it, or as a person does."""
    forms = [str(default)]
    if isinstance(default, float):
        forms += [f"{default:g}", f"{default:,g}"]
    if isinstance(default, int) and not isinstance(default, bool):
        forms.append(f"{default:,}")
    if isinstance(default, Path):
        forms.append(default.as_posix())
    return forms


_PARSERS = list(_parsers(build_parser()))
_ACTIONS = _actions()
_IDS = [f"{path} {_name(action)}" for path, _, action in _ACTIONS]


def test_the_walk_reaches_every_subcommand() -> None:
    paths = {path for path, _ in _PARSERS}
    for expected in (
        "kvroute events decode",
        "kvroute events listen",
        "kvroute sim",
        "kvroute serve",
        "kvroute bench",
        "kvroute demo",
        "kvroute relay",
        "kvroute keys generate",
    ):
        assert expected in paths


def test_the_allow_list_names_real_options() -> None:
    options = {(path, _name(action)) for path, _, action in _ACTIONS}
    assert options >= _NONE_DEFAULT_UNEXPLAINED


@pytest.mark.parametrize(("path", "parser"), _PARSERS, ids=[path for path, _ in _PARSERS])
def test_every_help_renders(path: str, parser: argparse.ArgumentParser) -> None:
    """`kvroute ... -h` works: no help text trips over argparse's %-formatting."""
    assert parser.format_help().startswith(f"usage: {path}")


@pytest.mark.parametrize(("path", "parser", "action"), _ACTIONS, ids=_IDS)
def test_every_argument_has_help(
    path: str, parser: argparse.ArgumentParser, action: argparse.Action
) -> None:
    assert action.help and action.help != argparse.SUPPRESS and action.help.strip(), (
        f"{path} {_name(action)}: no help text"
    )
    if isinstance(action, argparse._SubParsersAction):
        for choice in action._choices_actions:  # each subcommand's line in the listing
            assert choice.help and choice.help.strip(), f"{path} {choice.dest}: no help text"


@pytest.mark.parametrize(("path", "parser", "action"), _ACTIONS, ids=_IDS)
def test_every_default_is_shown(
    path: str, parser: argparse.ArgumentParser, action: argparse.Action
) -> None:
    if not _takes_value(action) or isinstance(action, argparse._SubParsersAction):
        return
    text = _rendered(parser, action)
    where = f"{path} {_name(action)}: {text!r}"
    assert "default: None" not in text and "default None" not in text, where
    default = action.default
    if default is argparse.SUPPRESS or action.required:
        return
    if default is None:
        # Nothing is passed on: the help must say in words what happens then.
        if (path, _name(action)) not in _NONE_DEFAULT_UNEXPLAINED:
            assert "default" in text, f"{where}: the default (None) is not explained"
        return
    assert "default" in text, f"{where}: default {default!r} not shown"
    values = list(default) if isinstance(default, list | tuple) else [default]
    for value in values:
        if value == "":
            continue  # an empty string is explained in words
        assert any(form in text for form in _shown(value)), f"{where}: {value!r} not shown"
