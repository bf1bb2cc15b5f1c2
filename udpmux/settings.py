"""Typed settings, as every mode's configuration declares them (config.py): a Setting
is a name, a check and a default; the checks here are the ones more than one table
uses; values come from a TOML table (check_settings) or a command line (option_values,
which turns option text into the type its check expects), and settled() fills in the
defaults.  Messages name the key as the file spells it, or the option as the command
line does (in_option_words).
"""

import difflib
import math
import re
from dataclasses import dataclass

from udpmux.addr import shown
from udpmux.errors import ConfigError, UsageError


def whole_numbers(low, high=None, unit=""):
    """A check of whole numbers from low, to high when given (unit: words after it)."""
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"expected a whole number of at least {low}, got {shown(value)}")
        if high is not None and value > high:
            raise ValueError(f"expected at most {high}{unit}, got {value}")
        return value
    return check


positive_int = whole_numbers(1)


def positive_number(value):
    """A finite number above 0, as a float: TOML has inf and nan, and an integer past
    what a float holds (10**400) does not turn into one."""
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isfinite(number) and number > 0:
            return number
    raise ValueError(f"expected a number above 0, got {shown(value)}")


def nonempty_text(value):
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {shown(value)}")
    return value


def boolean(value):
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {shown(value)}")
    return value


@dataclass(frozen=True)
class Setting:
    name: str           # the key in the file; the option is --name-with-dashes
    check: object       # value from TOML (or option text, converted) -> value; ValueError
    default: object
    help: str

    @property
    def option(self):
        return "--" + self.name.replace("_", "-")


def unknown_setting(key, known, where):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{where}: unknown setting {shown(key)}{hint}"


def settled(settings, values, only=None, exclude=()):
    """Every setting's value: the one given, else the table's default (the only place a
    default is written).  only: these names alone; exclude: all but these."""
    return {s.name: values.get(s.name, s.default) for s in settings
            if s.name not in exclude and (only is None or s.name in only)}


def check_settings(table, settings, where, problems=None):
    """The table's values, checked.  The first problem raises ConfigError, or, given a
    list of problems, every one is added to it and its key left out."""
    out = {}
    for key, value in table.items():
        setting = settings.get(key)
        try:
            if setting is None:
                raise ConfigError(unknown_setting(key, settings, where))
            try:
                out[key] = setting.check(value)
            except ValueError as exc:
                raise ConfigError(f"{where}: {key}: {exc}") from None
        except ConfigError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
    return out


def raise_problems(problems):
    """ConfigError with every problem found, if any."""
    if problems:
        more = len(problems) - 1
        first = problems[0] + (f" (and {more} more: `udpmux check` lists them)"
                               if more else "")
        raise ConfigError(first, problems=problems)


def default_text(setting):
    """A setting's default as the command line's help shows it."""
    value = setting.default
    return f"{value:g}" if isinstance(value, float) else str(value)


def option_values(args, settings):
    """Checked values of the settings given on a command line; UsageError names the option."""
    values = {}
    for setting in settings:
        raw = args.get(setting.option)
        if raw is None or raw is False:
            continue
        try:
            values[setting.name] = setting.check(from_text(setting, raw))
        except ValueError as exc:
            raise UsageError(f"{setting.option}: {exc}") from None
    return values


_WHOLE_TEXT = re.compile(r"[0-9]{1,30}")
_NUMBER_TEXT = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def whole_number(text):
    """A whole number written in ASCII digits; ValueError for anything else (int() also
    takes "+5", " 5", "1_000" and other scripts' digits)."""
    if not _WHOLE_TEXT.fullmatch(text):
        raise ValueError(f"expected a whole number, got {text!r}")
    return int(text)


def from_text(setting, raw):
    """Option text as the type its setting checks (the check then words any error).

    Only plain decimals are converted: ASCII digits and, for a number that may have a
    fraction, one decimal point.  int() and float() also take "+5", " 5", "1_000",
    "٥", "inf", "nan" and "1e999"; those stay text, which the check refuses."""
    if not isinstance(raw, str):
        return raw
    convert = {positive_int: int, positive_number: float}.get(setting.check)
    if convert is None and type(setting.default) in (int, float):
        convert = type(setting.default)
    if convert is int and _WHOLE_TEXT.fullmatch(raw):
        return int(raw)
    if convert is float and _NUMBER_TEXT.fullmatch(raw) and math.isfinite(float(raw)):
        return float(raw)
    return raw


def in_option_words(message, settings):
    """A message that starts with setting names ("key_file and insecure: ...") in the
    command line's words ("--key-file and --insecure: ..."); the rest, which may quote
    what the user wrote, stays as it is."""
    head, sep, rest = message.partition(": ")
    options = {s.name: s.option for s in settings}
    names = head.split(" and ")
    if not sep or not all(name in options for name in names):
        return message
    return " and ".join(options[name] for name in names) + sep + rest
