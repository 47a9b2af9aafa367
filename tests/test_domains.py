import pandas as pd
import pytest

from calibnet.domains import check_domains_cover_cases, read_domains, write_domains
from calibnet.errors import CalibnetError


def _write(tmp_path, text):
    path = tmp_path / "domains.csv"
    path.write_text(text)
    return path


def test_reads_required_and_extra_columns_as_strings(tmp_path):
    path = _write(tmp_path, "case_id,center,vendor,field_strength,patient\nA,C1,GE,1.5,007\nB, C2 ,Siemens,3,008\n")
    table = read_domains(path)
    assert list(table["center"]) == ["C1", "C2"]
    assert list(table["patient"]) == ["007", "008"]  # leading zeros kept


@pytest.mark.parametrize("text, expected", [
    ("case_id,center\nA,C1\n", "lacks the column(s) vendor"),
    ("case_id,center,vendor\nA,C1,\n", "case A has an empty 'vendor'"),
    ("case_id,center,vendor\nA,,GE\n", "case A has an empty 'center'"),
    ("case_id,center,vendor\nA,C1,GE\nA,C2,GE\n", "case A has more than one row"),
])
def test_malformed_domains_name_the_file_and_case(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(CalibnetError) as e:
        read_domains(path)
    assert expected in str(e.value)
    assert str(path) in str(e.value)


def test_missing_file_says_what_is_needed(tmp_path):
    with pytest.raises(CalibnetError, match="domains.csv is missing.*case_id, center, vendor"):
        read_domains(tmp_path / "domains.csv")


def test_cover_cases_names_the_missing_and_the_extra_case(tmp_path):
    table = pd.DataFrame({"case_id": ["A", "B"], "center": ["C1", "C1"], "vendor": ["GE", "GE"]})
    with pytest.raises(CalibnetError, match="case C has images but no row"):
        check_domains_cover_cases(table, ["A", "B", "C"], "domains.csv")
    with pytest.raises(CalibnetError, match="case B has a row but no image"):
        check_domains_cover_cases(table, ["A"], "domains.csv")
    check_domains_cover_cases(table, ["B", "A"], "domains.csv")


def test_write_then_read_round_trip(tmp_path):
    table = pd.DataFrame({"vendor": ["GE"], "case_id": ["A"], "center": ["C1"], "scanner": ["x"]})
    write_domains(table, tmp_path / "domains.csv")
    assert (tmp_path / "domains.csv").read_text().splitlines()[0] == "case_id,center,vendor,scanner"
    assert read_domains(tmp_path / "domains.csv").iloc[0].to_dict() == {
        "case_id": "A", "center": "C1", "vendor": "GE", "scanner": "x"}
