"""The ``fedalign bench`` suites: one registry, one frozen record per suite.

A suite module describes itself with a :class:`BenchSuite` and calls :func:`register` when
it is imported (:mod:`fedalign.experiments.bench` imports every suite module, in the order
the command line lists them). :mod:`fedalign.cli` builds ``fedalign bench`` from
:data:`SUITES`: ``--suite`` accepts their names, each suite's :class:`SuiteOption` becomes
a flag, ``--help`` lists the suites, and the chosen suite's ``run`` gets a
:class:`BenchRequest` with the experiment configuration and its own options' values.

A suite may start from a configuration of its own: ``config_file`` (read when ``--config``
is not given) and ``defaults`` (``section.key=value`` overrides applied over the file); the
command line's named options and ``--set`` apply over both.

No argparse here: an option says its name, value type, default and help, and the command
line turns it into a flag.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedalign.config import ConfigError, ExperimentConfig


@dataclass(frozen=True)
class SuiteOption:
    """One option of a suite: ``--<name>`` on the command line.

    ``kind`` parses the value (``int``, ``float``, ``Path``...); ``None`` makes a flag that
    is ``True`` when given. Suites that share an option share the one record (the command
    line has one flag for it).
    """

    name: str
    help: str
    kind: Callable[[str], Any] | None = None
    default: Any = None

    @property
    def dest(self) -> str:
        """The key of the option's value in :attr:`BenchRequest.options`."""
        return self.name.replace("-", "_")


@dataclass(frozen=True)
class BenchRequest:
    """What a suite's ``run`` gets: the configuration, its options' values, a line logger
    and the command line that asked for it (suites that keep a ``COMMAND.txt`` record it)."""

    config: ExperimentConfig
    options: Mapping[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = lambda _line: None
    command: str = ""


def write_markdown(table: str, path: Path) -> None:
    """The default :attr:`BenchSuite.write`: the table and a final newline, parents made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table + "\n")


@dataclass(frozen=True)
class BenchSuite:
    """A ``fedalign bench`` suite.

    ``run`` measures and returns the Markdown table (or page) that is printed; ``write``
    writes it to ``--out-table`` when given (suites may write more files themselves, from
    their own options). ``config_file`` and ``defaults``: the suite's starting configuration
    (see the module).
    """

    name: str
    description: str
    run: Callable[[BenchRequest], str]
    options: tuple[SuiteOption, ...] = ()
    write: Callable[[str, Path], None] = write_markdown
    config_file: str | None = None
    defaults: tuple[str, ...] = ()


SUITES: dict[str, BenchSuite] = {}
"""Every registered suite by name, in registration order (the first is the default)."""


def register(suite: BenchSuite) -> BenchSuite:
    """Add ``suite`` to :data:`SUITES`; refuses a second suite of the same name and an
    option name used with different meanings by two suites."""
    if suite.name in SUITES:
        raise ValueError(f"bench suite {suite.name!r} is registered twice")
    for option in suite.options:
        for other in suite_options():
            if other.name == option.name and other != option:
                raise ValueError(f"bench option --{option.name} differs between suites")
    SUITES[suite.name] = suite
    return suite


def suite_names() -> list[str]:
    return list(SUITES)


def get_suite(name: str) -> BenchSuite:
    """The suite called ``name`` (:class:`ConfigError` naming the accepted ones)."""
    try:
        return SUITES[name]
    except KeyError:
        raise ConfigError(f"unknown bench suite {name!r}; accepted: {', '.join(SUITES)}") from None


def suite_options() -> list[SuiteOption]:
    """Every suite's options, each once, in registration order."""
    seen: dict[str, SuiteOption] = {}
    for suite in SUITES.values():
        for option in suite.options:
            seen.setdefault(option.name, option)
    return list(seen.values())


OUT_DIR = SuiteOption(
    "out-dir",
    "also write the suite's result files here (its page as .md, its rows as .json; the "
    "suites with a results folder of their own append the command to COMMAND.txt)",
    Path,
)
"""``--out-dir``, shared by the suites that write result files of their own."""


def comma_list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """Parser of a comma-separated option value: ``"2,4"`` -> ``[kind("2"), kind("4")]``."""

    def parse(text: str) -> list[Any]:
        return [kind(item) for item in text.split(",") if item.strip()]

    parse.__name__ = f"list of {getattr(kind, '__name__', 'value')}"
    return parse


def suites_using(option: SuiteOption) -> list[str]:
    """Names of the suites that take ``option``."""
    return [s.name for s in SUITES.values() if option in s.options]
