"""The package's error types, at the bottom of the layers so every layer can raise them.

* :class:`FedAlignError` is the base of every error a user can cause by a setting or an
  input; the command line turns it into a one-line message and exit code 2.
* :class:`ConfigError`: a configuration value is missing, unknown or out of range (the
  message names the key, the value and the accepted values).
* :class:`OptionError`: an option of a component (a strategy, a client loss term) is out of
  range. It names the option as the component knows it; the configuration layer, which
  knows where the option lives (``strategy.proximal-mu``), rewords it as a ConfigError.
* :class:`RunFolderError`: an output folder holds another run, or a checkpoint cannot be
  resumed with this configuration or package version.
* :class:`DataFileError`: a data file cannot be read (also a :class:`ConfigError`, since
  ``data.dataset`` names it).
* :class:`FederationError`: a round cannot go on (too few clients answered, every result
  was rejected).
"""

from __future__ import annotations


class FedAlignError(ValueError):
    """A setting or an input the user can fix."""


class ConfigError(FedAlignError):
    """A configuration value is missing, unknown or out of range."""


class RunFolderError(FedAlignError):
    """An output folder holds another run, or its checkpoint cannot be resumed."""


class DataFileError(ConfigError):
    """A data file named by ``data.dataset`` cannot be read as configured."""


class FederationError(FedAlignError):
    """A round cannot go on: too few client results arrived or passed validation."""


class OptionError(FedAlignError):
    """One option of a component is out of range.

    Parameters
    ----------
    option : str
        The option's field name (``proximal_mu``).
    value : object
        The value given.
    requirement : str
        What the value must satisfy, e.g. ``"must be >= 0"`` or
        ``"must be one of ['a', 'b']"``.
    """

    def __init__(self, option: str, value: object, requirement: str) -> None:
        self.option = option
        self.value = value
        self.requirement = requirement
        super().__init__(f"option {option!r} {requirement} (got {value!r})")


def check_option(
    option: str,
    value: float,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_minimum: bool = False,
) -> None:
    """Raise :class:`OptionError` unless ``minimum <= value <= maximum``.

    Parameters
    ----------
    option : str
    value : float
    minimum, maximum : float or None, default None
        Bounds (``None`` = unbounded).
    strict_minimum : bool, default False
        Require ``value > minimum`` instead of ``>=``.
    """
    if minimum is not None:
        if strict_minimum and not value > minimum:
            raise OptionError(option, value, f"must be > {minimum}")
        if not strict_minimum and not value >= minimum:
            raise OptionError(option, value, f"must be >= {minimum}")
    if maximum is not None and not value <= maximum:
        raise OptionError(option, value, f"must be <= {maximum}")


def check_choice(option: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    """Raise :class:`OptionError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise OptionError(option, value, f"must be one of {list(choices)}")
