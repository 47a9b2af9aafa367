import pandas as pd
import pytest

from calibnet.errors import CalibnetError
from calibnet.planners.splits import (build_calib_splits, build_loco_folds, build_scanner_folds, get_fold,
                                      nnunet_splits_from_loco)


def _domains(spec):
    """spec: list of (center, vendor, n_cases)."""
    rows = [{"case_id": f"{center}_{i:02d}", "center": center, "vendor": vendor}
            for center, vendor, n in spec for i in range(n)]
    return pd.DataFrame(rows)


MULTI = _domains([("A", "Siemens", 10), ("B", "GE", 6), ("C", "Siemens", 5), ("D", "Philips", 4)])


def test_each_loco_fold_holds_out_exactly_one_center_in_sorted_order():
    folds = build_loco_folds(MULTI)
    center_of = dict(zip(MULTI.case_id, MULTI.center))
    assert [f["held_out"]["center"] for f in folds] == ["A", "B", "C", "D"]
    for f in folds:
        held = f["held_out"]["center"]
        assert {center_of[c] for c in f["test"]} == {held}
        assert held not in {center_of[c] for c in f["train"] + f["val"]}
        assert len(f["test"]) == (MULTI.center == held).sum()


@pytest.mark.parametrize("family", ["loco", "scanner"])
def test_train_val_test_are_disjoint_and_cover_every_case(family):
    splits = build_calib_splits(MULTI)
    for f in splits[family]["folds"]:
        train, val, test = set(f["train"]), set(f["val"]), set(f["test"])
        assert not (train & val) and not (train & test) and not (val & test)
        assert train | val | test == set(MULTI.case_id)


def test_val_is_about_a_fifth_of_every_source_center():
    fold = build_loco_folds(MULTI)[3]  # holds out D; sources A (10), B (6), C (5)
    center_of = dict(zip(MULTI.case_id, MULTI.center))
    val_per_center = pd.Series([center_of[c] for c in fold["val"]]).value_counts().to_dict()
    assert val_per_center == {"A": 2, "B": 1, "C": 1}


def test_scanner_folds_are_ordered_by_vendor_size_and_test_on_other_vendors():
    folds, skipped = build_scanner_folds(MULTI)
    assert skipped is None
    assert [f["source"]["vendor"] for f in folds] == ["Siemens", "GE", "Philips"]
    vendor_of = dict(zip(MULTI.case_id, MULTI.vendor))
    for f in folds:
        source = f["source"]["vendor"]
        assert {vendor_of[c] for c in f["train"] + f["val"]} == {source}
        assert source not in {vendor_of[c] for c in f["test"]}
        assert sorted(f["targets"]) == sorted({"Siemens", "GE", "Philips"} - {source})


def test_unknown_vendor_cases_stay_out_of_the_scanner_split():
    domains = _domains([("A", "Siemens", 4), ("B", "GE", 4), ("C", "unknown", 9)])
    folds, _ = build_scanner_folds(domains)
    assert [f["source"]["vendor"] for f in folds] == ["GE", "Siemens"]  # tie broken by name
    assert all(not c.startswith("C_") for f in folds for c in f["train"] + f["val"] + f["test"])


def test_single_vendor_skips_the_scanner_split_with_a_reason():
    splits = build_calib_splits(_domains([("A", "GE", 4), ("B", "GE", 4)]))
    assert splits["scanner"]["folds"] == []
    assert "at least 2 known vendors, found GE" in splits["scanner"]["skipped"]
    with pytest.raises(CalibnetError, match="scanner split is not available"):
        get_fold(splits, "scanner", 0)


def test_single_center_makes_loco_impossible():
    with pytest.raises(CalibnetError, match="at least 2 centers.*center A"):
        build_calib_splits(_domains([("A", "GE", 4)]))


def test_patients_never_straddle_train_and_val():
    domains = _domains([("A", "GE", 12), ("B", "Siemens", 12)])
    domains["patient"] = [f"p{i // 3}" for i in range(len(domains))]  # 3 timepoints per patient
    for f in build_loco_folds(domains, seed=3):
        patient_of = dict(zip(domains.case_id, domains.patient))
        assert not {patient_of[c] for c in f["train"]} & {patient_of[c] for c in f["val"]}
        assert f["val"]


def test_splits_are_seeded():
    assert build_calib_splits(MULTI, seed=1) == build_calib_splits(MULTI, seed=1)
    assert build_calib_splits(MULTI, seed=1)["loco"] != build_calib_splits(MULTI, seed=2)["loco"]


def test_unknown_fold_lists_the_valid_ones_instead_of_falling_back():
    splits = build_calib_splits(MULTI)
    with pytest.raises(CalibnetError) as e:
        get_fold(splits, "loco", 4)
    assert "fold 4 does not exist in the loco split" in str(e.value)
    assert "fold 0 holds out center A" in str(e.value) and "fold 3 holds out center D" in str(e.value)
    with pytest.raises(CalibnetError, match="fold 'all' does not exist"):
        get_fold(splits, "loco", "all")
    with pytest.raises(CalibnetError, match="unknown split 'center'"):
        get_fold(splits, "center", 0)
    assert get_fold(splits, "scanner", 2)["source"] == {"vendor": "Philips"}


def test_nnunet_splits_are_the_loco_train_val():
    splits = build_calib_splits(MULTI)
    nnunet = nnunet_splits_from_loco(splits)
    assert len(nnunet) == 4
    assert nnunet[1] == {"train": splits["loco"]["folds"][1]["train"], "val": splits["loco"]["folds"][1]["val"]}
