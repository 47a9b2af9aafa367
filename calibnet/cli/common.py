"""What every calibnet command shares: data roots printed once, user errors as one clean line."""
from __future__ import annotations

import functools

import click

from calibnet.errors import CalibnetError, UsageError
from calibnet.paths import DataRoots, setup_data_roots


def data_roots() -> DataRoots:
    """Set up the nnU-Net roots from CALIBNET_DATA and print them."""
    roots = setup_data_roots()
    click.echo(roots.describe())
    return roots


def user_errors(command):
    """Turn :class:`CalibnetError` into click's one-line ``Error: ...`` and exit status 1 (a
    :class:`UsageError` into click's usage error, status 2)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UsageError as e:
            raise click.UsageError(str(e)) from None
        except CalibnetError as e:
            raise click.ClickException(str(e)) from None
    return wrapper


def parse_int_tuple(text: str, length: int, option: str) -> tuple:
    """``"64"`` → (64,)*length; ``"64,80,64"`` → (64, 80, 64)."""
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a list of integers", param_hint=option) from None
    if len(values) == 1:
        values = values * length
    if len(values) != length:
        raise click.BadParameter(f"give one integer or {length} separated by commas, not {text!r}",
                                 param_hint=option)
    return values
