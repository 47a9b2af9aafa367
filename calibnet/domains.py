"""``domains.csv``: the center/vendor metadata of every training case (DESIGN §4).

Every stage reads it through :func:`read_domains`, so a malformed file gives the same message
wherever it is first touched.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import pandas as pd

from calibnet.errors import CalibnetError
from calibnet.files import atomic_write_text

DOMAINS_FILENAME = "domains.csv"
REQUIRED_COLUMNS = ("case_id", "center", "vendor")
OPTIONAL_COLUMNS = ("scanner", "field_strength", "condition")
UNKNOWN_VENDOR = "unknown"


def read_domains(path: os.PathLike) -> pd.DataFrame:
    """Read and validate a ``domains.csv``; every value is kept as a string.

    Raises :class:`CalibnetError` naming the file and the case when the file is missing, a required
    column is absent, a case id is duplicated or a ``center``/``vendor`` cell is empty.
    """
    path = Path(path)
    if not path.is_file():
        raise CalibnetError(
            f"{path} is missing: every dataset needs a domains.csv with columns "
            f"{', '.join(REQUIRED_COLUMNS)} (one row per training case); calib_convert writes it.")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise CalibnetError(f"{path} is not a readable CSV file ({e}).") from None
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise CalibnetError(
            f"{path} lacks the column(s) {', '.join(missing)}; found {', '.join(table.columns) or 'none'}.")
    table = table.apply(lambda col: col.str.strip())
    duplicated = table["case_id"][table["case_id"].duplicated()].unique()
    if len(duplicated):
        raise CalibnetError(f"{path}: case {duplicated[0]} has more than one row; keep one row per case.")
    for column in ("case_id", "center", "vendor"):
        empty = table.index[table[column] == ""]
        if len(empty):
            row = empty[0]
            who = table.at[row, "case_id"] or f"row {row + 2}"
            raise CalibnetError(
                f"{path}: case {who} has an empty '{column}'; fill it in "
                f"(use '{UNKNOWN_VENDOR}' for a vendor that is not known).")
    return table.reset_index(drop=True)


def check_domains_cover_cases(domains: pd.DataFrame, case_ids: Iterable[str], path: os.PathLike) -> None:
    """Raise unless ``domains`` has exactly one row for each of ``case_ids`` and no other rows."""
    case_ids = set(case_ids)
    listed = set(domains["case_id"])
    without_row = sorted(case_ids - listed)
    if without_row:
        more = f" (and {len(without_row) - 1} more)" if len(without_row) > 1 else ""
        raise CalibnetError(f"{path}: case {without_row[0]}{more} has images but no row; add its center and vendor.")
    without_image = sorted(listed - case_ids)
    if without_image:
        more = f" (and {len(without_image) - 1} more)" if len(without_image) > 1 else ""
        raise CalibnetError(
            f"{path}: case {without_image[0]}{more} has a row but no image in imagesTr; remove the row or add the case.")


def _spelling_key(name: str) -> str:
    return "".join(name.casefold().split())


def check_domain_spellings(domains: pd.DataFrame, path: os.PathLike) -> None:
    """Refuse two spellings of one center or vendor that differ only in case or spaces (``siemens`` beside
    ``Siemens``), which would make two domains (and a fold) of one; names both with their case counts."""
    for column in ("center", "vendor"):
        counts = domains[column].value_counts()
        spellings = {}
        for name in sorted(counts.index):
            spellings.setdefault(_spelling_key(name), []).append(name)
        clash = next((names for names in spellings.values() if len(names) > 1), None)
        if clash:
            named = " and ".join(f"'{n}' ({counts[n]} case{'s' if counts[n] != 1 else ''})" for n in clash)
            raise CalibnetError(f"{path}: {column} {named} differ only in case or spaces; spell each {column} one "
                                f"way (one {column} would otherwise be split into several domains).")


def write_domains(domains: pd.DataFrame, path: os.PathLike) -> None:
    """Write ``domains`` (required columns first) atomically."""
    columns = list(REQUIRED_COLUMNS) + [c for c in domains.columns if c not in REQUIRED_COLUMNS]
    atomic_write_text(path, domains[columns].to_csv(index=False))
