"""Suite files (``benchmarks/*.toml``) parsed into a typed :class:`Suite`.

A suite file is an ordinary experiment config (the ``[model]``, ``[data]``, ... sections of
:class:`~fedalign.config.ExperimentConfig`) plus

* a ``[suite]`` table: ``name``, ``description``, ``note``, ``strategies`` (``"fedavg"``,
  ``"fedalign:consistency"``, ...), ``alphas``, ``seeds`` (a count or a list),
  ``reference`` (the strategy whose mean final accuracy sets the target and to which every
  strategy is compared seed by seed), ``versus`` (more strategies to pair every row with:
  one page ``versus-<label>.md`` each), ``target-fraction``, ``report`` (strategies that get
  a run report) and optional ``[suite.labels]`` (display names);
* optional ``[suite.variants.<label>]`` tables, each a row that is a strategy plus config
  settings: ``strategy = "fedalign"`` and ``set = {"strategy.selection" = "soft", ...}``.
  ``<label>`` then names the row in ``strategies``, ``reference``, ``report``, the labels,
  ``--strategies`` and the run folders (a paired ablation of single options);
* an optional ``[suite.tune]`` table, ``<label> = { key = "strategy.proximal-mu", values =
  [0.001, 0.01, 0.1, 1.0] }``: the row ``<label>`` runs once per value (hidden candidate
  rows, :func:`candidate_label`) and the results table reports, per alpha, the value with
  the best mean *final validation accuracy* over seeds (ties: the first listed); needs
  ``data.validation-examples`` > 0 (:mod:`.tuning`);
* an optional ``[suite.chosen]`` table, ``<label> = { key = "strategy.proximal-mu", results =
  "benchmarks/results/claim-tune", row = "fedprox" }``: the row ``<label>`` runs, at each
  alpha, with ``key`` set to the value that an earlier suite's ``[suite.tune]`` chose for its
  row ``row`` (default: ``<label>``) at that alpha (``results.json`` of that results folder):
  tune on validation examples held out of training, then train on the whole pool;
* an optional ``[quick]`` table with the same layout (``[quick.suite]``, ``[quick.data]``,
  ...) whose values replace the full-size ones under ``--quick``.

Strategy names in ``reference``, ``report`` and ``[suite.labels]`` may be written either
way (``fedalign:consistency`` or the run label ``fedalign-consistency``).
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedalign.config import ConfigError, ExperimentConfig, default_variant, run_label

SUITE_NAMES = ("main", "ablation")
"""Suites shipped under ``benchmarks/`` (``--suite`` also takes a path to a TOML file)."""

SUITE_KEYS = (
    "name",
    "description",
    "note",
    "strategies",
    "alphas",
    "seeds",
    "reference",
    "versus",
    "report",
    "target-fraction",
    "labels",
    "variants",
    "tune",
    "chosen",
)
"""Keys accepted in the ``[suite]`` table."""

DEFAULT_STRATEGIES = ("fedavg", "fedprox", "fedmoe", "fedalign")


@dataclass(frozen=True)
class Variant:
    """A suite row that runs a strategy with extra config settings.

    Parameters
    ----------
    name : str
        Strategy name (``strategy.name``).
    ablation : str
        FedAlign-MoE ablation row (``strategy.ablation``), the default variant otherwise.
    settings : dict of str to Any
        ``section.key`` -> value, applied after the suite's base config.
    """

    name: str
    ablation: str
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tune:
    """A config key of one suite row chosen on validation accuracy among ``values``.

    Parameters
    ----------
    key : str
        ``section.key`` (hyphens or underscores), e.g. ``strategy.proximal-mu``.
    values : list
        Candidates in table order (the first wins ties).
    """

    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Chosen:
    """A config key of one suite row taken, per alpha, from another suite's tuning.

    Parameters
    ----------
    key : str
        ``section.key``, e.g. ``strategy.proximal-mu``.
    results : Path
        That suite's results folder (its ``results.json`` lists the choices).
    row : str
        The tuned row's run label in that suite.
    tuned_key : str
        The key that suite tuned (``tuned-key``, default ``key``): a value chosen for one knob
        may set another, e.g. FedProx's chosen ``proximal-mu`` as another row's
        ``client-proximal-mu``.
    """

    key: str
    results: Path
    row: str
    tuned_key: str


def _value_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def candidate_label(label: str, tune: Tune, value: Any) -> str:
    """Run label (and folder name) of one candidate: ``fedprox--proximal-mu-0.01``."""
    return f"{label}--{tune.key.rpartition('.')[2].replace('_', '-')}-{_value_text(value)}"


@dataclass
class Suite:
    """A benchmark grid read from a suite file.

    Parameters
    ----------
    name : str
        Short name, used for the default output folder.
    path : Path
        The suite file.
    base : dict
        Experiment-config sections (hyphenated keys) shared by every run.
    strategies : list of (str, str)
        ``(strategy, ablation)`` pairs, in table order.
    alphas : list of float
        Dirichlet concentrations.
    seeds : list of int
        Seeds; each one seeds partitioning, initialisation and training of its runs.
    reference : str
        Run label of the strategy the others are compared with (e.g. ``"fedavg"``).
    versus : list of str
        More run labels to pair every row with (a page each, ``versus-<label>.md``).
    target_fraction : float
        Target accuracy = ``target_fraction`` x the reference's mean final accuracy.
    labels : dict of str to str
        Display names by run label (missing ones show the label itself).
    description, note : str
        Paragraphs for the results page.
    report : list of str
        Run labels whose first-seed run at every alpha gets a ``fedalign report`` page.
    variants : dict of str to Variant
        Rows named by a label of their own (``strategies`` holds ``(label, default variant)``).
    tune : dict of str to Tune
        Rows (by run label) whose ``Tune.key`` is chosen on validation accuracy.
    chosen : dict of str to Chosen
        Rows (by run label) whose ``Chosen.key`` another suite's tuning chose.
    quick : bool
        Whether the ``[quick]`` overrides were applied.
    """

    name: str
    path: Path
    base: dict[str, Any]
    strategies: list[tuple[str, str]]
    alphas: list[float]
    seeds: list[int]
    reference: str = "fedavg"
    versus: list[str] = field(default_factory=list)
    target_fraction: float = 1.0
    labels: dict[str, str] = field(default_factory=dict)
    description: str = ""
    note: str = ""
    report: list[str] = field(default_factory=list)
    variants: dict[str, Variant] = field(default_factory=dict)
    tune: dict[str, Tune] = field(default_factory=dict)
    chosen: dict[str, Chosen] = field(default_factory=dict)
    quick: bool = False

    @property
    def strategy_labels(self) -> list[str]:
        return [run_label(name, ablation) for name, ablation in self.strategies]

    @property
    def reference_label(self) -> str:
        """The reference when it is in the grid, else the first listed strategy."""
        labels = self.strategy_labels
        return self.reference if self.reference in labels else labels[0]

    def display(self, label: str) -> str:
        """The name a table shows for run label ``label``."""
        return self.labels.get(label, label)


def parse_strategy(item: str) -> tuple[str, str]:
    """``"fedalign:consistency"`` -> ``("fedalign", "consistency")``; without a variant the
    default one (:func:`fedalign.config.default_variant`)."""
    name, _, ablation = item.strip().partition(":")
    return name, ablation or default_variant(name)


def parse_strategies(items: Sequence[str]) -> list[tuple[str, str]]:
    """Parse strategy items (``"fedavg"``, ``"fedalign:consistency"``), skipping blanks.

    Raises
    ------
    ConfigError
        When no strategy is named.
    """
    pairs = [parse_strategy(item) for item in items if item.strip()]
    if not pairs:
        raise ConfigError("the strategy list must name at least one strategy")
    return pairs


def label_of(item: str) -> str:
    """The run label of a strategy item, either spelling: ``fedalign:x`` -> ``fedalign-x``."""
    return run_label(*parse_strategy(item)) if ":" in item else item


def suite_directories() -> list[Path]:
    """Where suite names are looked up: ``./benchmarks`` then the source tree's."""
    here = Path(__file__).resolve().parents[4] / "benchmarks"
    return [Path.cwd() / "benchmarks", here]


def find_suite_file(name_or_path: str) -> Path:
    """Resolve ``--suite``: a path to a TOML file or the name of one under ``benchmarks/``.

    Raises
    ------
    ConfigError
        When no such file exists.
    """
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    if candidate.suffix == ".toml" or len(candidate.parts) > 1:
        raise ConfigError(f"--suite {name_or_path!r}: no such file")
    for directory in suite_directories():
        path = directory / f"{name_or_path}.toml"
        if path.is_file():
            return path
    raise ConfigError(
        f"--suite {name_or_path!r}: no benchmarks/{name_or_path}.toml found; "
        f"shipped suites: {list(SUITE_NAMES)}, or pass a path to a suite TOML file"
    )


def merge_tables(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge of TOML tables: values of ``override`` win, sub-tables merge."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_tables(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def seed_list(value: Any, start: int) -> list[int]:
    """Seeds from a count (``start``, ``start + 1``, ...) or an explicit list of ints."""
    if isinstance(value, bool):
        raise ConfigError(f"suite.seeds must be a count or a list of ints (got {value!r})")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"suite.seeds must be >= 1 (got {value})")
        return [start + i for i in range(value)]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [int(v) for v in value]
    raise ConfigError(f"suite.seeds must be a count or a non-empty list of ints (got {value!r})")


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict; missing or invalid files raise :class:`ConfigError`."""
    try:
        with Path(path).open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as error:
        raise ConfigError(f"{what} {str(path)!r} not found") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{what} {str(path)!r} is not valid TOML: {error}") from error


def _suite_table(data: dict[str, Any], path: Path) -> dict[str, Any]:
    table = data.pop("suite", None)
    if not isinstance(table, Mapping):
        raise ConfigError(f"suite file {str(path)!r} has no [suite] table")
    table = {key.replace("_", "-"): value for key, value in table.items()}
    unknown = sorted(set(table) - set(SUITE_KEYS))
    if unknown:
        raise ConfigError(f"unknown [suite] keys {unknown}; accepted: {sorted(SUITE_KEYS)}")
    return table


def _non_empty_list(table: Mapping[str, Any], key: str, default: list[Any], what: str) -> list[Any]:
    value = table.get(key, default)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"suite.{key} must be a non-empty list of {what}")
    return value


def _grid(table: Mapping[str, Any], base: ExperimentConfig) -> dict[str, Any]:
    """Strategies, alphas, seeds and target fraction of a ``[suite]`` table, checked."""
    strategies = parse_strategies(
        [str(s) for s in _non_empty_list(table, "strategies", list(DEFAULT_STRATEGIES), "strings")]
    )
    alphas = _non_empty_list(table, "alphas", [base.partition.alpha], "numbers")
    fraction = float(table.get("target-fraction", 1.0))
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"suite.target-fraction must be in (0, 1] (got {fraction})")
    return {
        "strategies": strategies,
        "alphas": [float(a) for a in alphas],
        "seeds": seed_list(table.get("seeds", 3), base.federated.seed),
        "target_fraction": fraction,
    }


def _variants(table: Mapping[str, Any], base: ExperimentConfig) -> dict[str, Variant]:
    """The ``[suite.variants.<label>]`` rows, each checked against the config."""
    raw = table.get("variants", {})
    if not isinstance(raw, Mapping):
        raise ConfigError("suite.variants must be a table of label = {strategy, set}")
    variants = {}
    for label, spec in raw.items():
        if not isinstance(spec, Mapping) or "strategy" not in spec:
            raise ConfigError(f'suite.variants.{label} needs strategy = "name[:ablation]"')
        unknown = sorted(set(spec) - {"strategy", "set"})
        if unknown:
            raise ConfigError(
                f"suite.variants.{label}: unknown keys {unknown}; accepted: ['set', 'strategy']"
            )
        settings = spec.get("set", {})
        if not isinstance(settings, Mapping):
            raise ConfigError(f"suite.variants.{label}.set must be a table of section.key = value")
        name, ablation = parse_strategy(str(spec["strategy"]))
        variant = Variant(name, ablation, {str(k): v for k, v in settings.items()})
        apply_variant(base.copy(), variant).validate()  # names a bad key or value now
        variants[str(label)] = variant
    return variants


def _row_items(
    table: Mapping[str, Any], section: str, strategies: list[tuple[str, str]], shape: str
) -> Iterator[tuple[str, str, Any]]:
    """``(item, run label, spec)`` of each entry of ``[suite.<section>]``, whose keys must
    name rows of ``strategies`` (either spelling)."""
    raw = table.get(section, {})
    if not isinstance(raw, Mapping):
        raise ConfigError(f"suite.{section} must be a table of label = {shape}")
    rows = [run_label(name, ablation) for name, ablation in strategies]
    for item, spec in raw.items():
        label = label_of(str(item))
        if label not in rows:
            raise ConfigError(
                f"suite.{section}.{item}: no such row in suite.strategies (rows: {rows})"
            )
        yield str(item), label, spec


def _tune(
    table: Mapping[str, Any],
    base: ExperimentConfig,
    strategies: list[tuple[str, str]],
    variants: Mapping[str, Variant],
) -> dict[str, Tune]:
    """The ``[suite.tune]`` rows, each value checked against its row's config."""
    pairs = {run_label(name, ablation): (name, ablation) for name, ablation in strategies}
    tunes = {}
    for item, label, spec in _row_items(table, "tune", strategies, "{key, values}"):
        if not isinstance(spec, Mapping) or set(spec) != {"key", "values"}:
            raise ConfigError(
                f'suite.tune.{item} must be {{ key = "section.key", values = [...] }} '
                f"(got {spec!r})"
            )
        values = spec["values"]
        if (
            not isinstance(values, list)
            or len(values) < 2
            or len(set(map(repr, values))) < len(values)
        ):
            raise ConfigError(
                f"suite.tune.{item}.values must list at least two distinct values (got {values!r})"
            )
        tune = Tune(str(spec["key"]), tuple(values))
        variant = variants.get(label, Variant(*pairs[label]))
        for value in values:
            config = apply_variant(base.copy(), variant)
            config.set(tune.key, value)  # names a bad key or value now
            config.validate()
        tunes[label] = tune
    return tunes


def _chosen(
    table: Mapping[str, Any], strategies: list[tuple[str, str]], tune: Mapping[str, Tune]
) -> dict[str, Chosen]:
    """The ``[suite.chosen]`` rows (their values are read when the grid is planned)."""
    chosen = {}
    for item, label, spec in _row_items(table, "chosen", strategies, "{key, results, row}"):
        if label in tune:
            raise ConfigError(f"suite.chosen.{item}: the row is tuned here too (suite.tune)")
        accepted = {"key", "results", "row", "tuned-key"}
        if not isinstance(spec, Mapping) or not {"key", "results"} <= set(spec) <= accepted:
            raise ConfigError(
                f'suite.chosen.{item} must be {{ key = "section.key", results = "<results '
                f'folder>", row = "<label there>", tuned-key = "<key there>" }} (row and '
                f"tuned-key optional; got {spec!r})"
            )
        key = str(spec["key"])
        _check_key(key, f"suite.chosen.{item}")
        row = label_of(str(spec.get("row", label)))
        tuned_key = str(spec.get("tuned-key", key))
        chosen[label] = Chosen(key, Path(str(spec["results"])), row, tuned_key)
    return chosen


def _check_key(key: str, where: str) -> None:
    """Raise naming ``where`` when ``key`` is not a ``section.key`` of the config."""
    config = ExperimentConfig()
    section, _, name = key.partition(".")
    try:
        current = getattr(getattr(config, section.replace("-", "_")), name.replace("-", "_"))
    except AttributeError:
        current = None
    try:
        config.set(key, current)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from error


def apply_variant(config: ExperimentConfig, variant: Variant) -> ExperimentConfig:
    """``config`` with the variant's strategy, ablation and settings (modified in place)."""
    config.strategy.name = variant.name
    config.strategy.ablation = variant.ablation
    for key, value in variant.settings.items():
        config.set(key, value)
    return config


def _string_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"suite.{key} must be a list of strategy labels (got {value!r})")
    return value


def _names(table: Mapping[str, Any], strategies: list[tuple[str, str]]) -> dict[str, Any]:
    """Reference, display labels and report list, keyed by run label."""
    labels = table.get("labels", {})
    if not isinstance(labels, Mapping):
        raise ConfigError("suite.labels must be a table of label = display name")
    report = table.get("report", [run_label(*strategies[-1])])
    if not isinstance(report, list):
        raise ConfigError("suite.report must be a list of strategy labels")
    return {
        "reference": label_of(str(table.get("reference", "fedavg"))),
        "versus": [label_of(str(v)) for v in _string_list(table.get("versus", []), "versus")],
        "labels": {label_of(str(k)): str(v) for k, v in labels.items()},
        "report": [label_of(str(r)) for r in report],
    }


def load_suite(path: Path, quick: bool = False) -> Suite:
    """Read a suite file (see the module docstring), applying ``[quick]`` when asked.

    Raises
    ------
    ConfigError
        On invalid TOML, a missing ``[suite]`` table, unknown keys or bad values.
    """
    data = read_toml(path, "suite file")
    quick_table = data.pop("quick", {})
    if quick:
        data = merge_tables(data, quick_table)
    table = _suite_table(data, Path(path))
    base_config = ExperimentConfig.from_dict(data)  # validates section and key names
    grid = _grid(table, base_config)
    variants = _variants(table, base_config)
    tune = _tune(table, base_config, grid["strategies"], variants)
    chosen = _chosen(table, grid["strategies"], tune)
    return Suite(
        name=str(table.get("name", Path(path).stem)),
        path=Path(path),
        base=data,
        description=str(table.get("description", "")).strip(),
        note=str(table.get("note", "")).strip(),
        quick=quick,
        variants=variants,
        tune=tune,
        chosen=chosen,
        **grid,
        **_names(table, grid["strategies"]),
    )
