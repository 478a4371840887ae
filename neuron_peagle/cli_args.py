"""What the command lines (`neuron-peagle`, `python -m compile.build`) share: a parser whose errors are
one line, options told apart from defaults, the library's field names shown as the options that set
them, and one exit-code policy (0 done, 2 refused, 130 interrupted).
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from neuron_peagle.errors import NeuronPeagleError, UsageError

EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130
# Library fields whose option has another name.
FIELD_ALIASES = {"model_dir": "model", "drafter_dir": "drafter"}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of printing usage and exiting, and remembers its
    options (and subcommands) so that `given` can tell an option given from one left at its default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # an abbreviation would hide which option was given
        self.options: list[argparse.Action] = []  # before super().__init__, which adds --help
        self.commands: dict[str, Parser] = {}
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.options.append(action)
        return action

    def add_subparsers(self, **kwargs):
        action = super().add_subparsers(**kwargs)
        self.commands = action.choices
        return action

    def error(self, message: str) -> None:
        raise UsageError(message)

    def command_parser(self, args: argparse.Namespace) -> "Parser":
        return self.commands[args.command] if self.commands else self

    def flags(self, args: argparse.Namespace) -> dict[str, str]:
        """Option dest -> its longest flag, for the command that was run."""
        return {a.dest: max(a.option_strings, key=len) for a in self.command_parser(args).options if a.option_strings}


def given(build_parser: Callable[[], Parser], argv: Sequence[str]) -> set[str]:
    """The dests of the options `argv` gives explicitly (even at their default value)."""
    parser = build_parser()
    for sub in [parser, *parser.commands.values()]:
        for action in sub.options:
            action.default = argparse.SUPPRESS
    args = parser.parse_args(list(argv))
    return set(vars(args)) & {a.dest for a in parser.command_parser(args).options}


def output_dir(text: str) -> Path:
    """An argparse type: a directory to write into (an empty string would mean the working directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a directory, got an empty string")
    return Path(text)


def buckets(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers (prefill buckets)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"buckets must be comma-separated integers, got {text!r}") from None


def with_flags(message: str, flags: dict[str, str]) -> str:
    """A library message with each field name it mentions written as the option that sets it
    (`max_new_tokens must be >= 1` -> `--max-new-tokens must be >= 1`)."""
    names = {**{field: flags[dest] for field, dest in FIELD_ALIASES.items() if dest in flags}, **flags}
    for field, flag in sorted(names.items(), key=lambda item: -len(item[0])):
        if "_" in field:
            message = re.sub(rf"(?<![\w-]){re.escape(field)}(?![\w-])", flag, message)
        elif message.startswith(field + " "):  # one-word fields only where they lead: "temperature must be..."
            message = flag + message[len(field):]
    return message


def _dash_hint(message: str, argv: Sequence[str], parser: Parser) -> str:
    """A hint for text that starts with '-' and was taken for an option: put it after `--`."""
    known = {flag for sub in [parser, *parser.commands.values()] for action in sub.options
             for flag in action.option_strings}
    takes_text = any(not action.option_strings for sub in parser.commands.values() for action in sub.options)
    taken = [a for a in argv if a.startswith("-") and a != "--" and a.split("=")[0] not in known]
    if not (takes_text and taken) or "--" in argv or not message.startswith(
            ("unrecognized arguments", "the following arguments")):
        return ""
    return (f" ({taken[0]!r} was read as an option: text that starts with '-' goes after the options and `--`, "
            f"e.g. {parser.prog} generate --max-new-tokens 32 -- {taken[0]!r})")


def run(prog: str, build_parser: Callable[[], Parser], argv: Sequence[str] | None,
        command: Callable[[argparse.Namespace, set[str]], int | None]) -> int:
    """Parse `argv`, run `command(args, given options)`; every refusal is one line on stderr and exit 2,
    an interrupt exits 130 (the command says what it kept), never a traceback for bad input."""
    as_program = argv is None  # the process is this command (not a caller passing its own arguments)
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    flags: dict[str, str] = {}
    try:
        args = parser.parse_args(argv)
        flags = parser.flags(args)
        return command(args, given(build_parser, argv)) or 0
    except UsageError as err:
        print(f"{prog}: error: {err}{_dash_hint(str(err), argv, parser)}", file=sys.stderr)
    except NeuronPeagleError as err:
        message = " ".join(str(err).split())
        print(f"{prog}: error: {message if err.names_as_written else with_flags(message, flags)}", file=sys.stderr)
    except KeyboardInterrupt:
        if as_program:
            # A second Ctrl-C while the process winds down (its threads joined at exit) would only print a
            # traceback of the interpreter's shutdown: the first one has been heard.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_REFUSED
