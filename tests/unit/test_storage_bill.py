"""The cost estimate of appending by compose on each bucket setting."""

from __future__ import annotations

import pytest

from protoagg_dagster.core.storage_bill import (
    GIB,
    BucketSettings,
    ObjectSettings,
    OperationsBill,
    bill_findings,
    expected_appends_per_day,
    operations_finding,
    replaced_copies_gib_days,
)

PLAIN = BucketSettings("logs", 0, False, "STANDARD", None, False)
TEN_GIB = ObjectSettings("log.pb", 10 * GIB, "STANDARD", held=False)


@pytest.mark.parametrize(
    ("appends", "size", "days", "gib_days"),
    [
        (1000, 10 * GIB, 7, 70_000.0),
        (24, GIB // 2, 7, 84.0),
        (0, 10 * GIB, 7, 0.0),
        (1000, 0, 7, 0.0),
    ],
)
def test_replaced_copies_are_appends_times_size_times_days(
    appends: float, size: int, days: float, gib_days: float
) -> None:
    assert replaced_copies_gib_days(appends, size, days) == pytest.approx(gib_days)


def test_expected_appends_are_capped_by_one_compose_a_second() -> None:
    assert expected_appends_per_day(1, 15) == 5760
    assert expected_appends_per_day(32, 15) == 86_400
    assert expected_appends_per_day(2, 0) == 86_400  # linger 0 counts as one second


def test_a_plain_standard_bucket_has_nothing_to_say() -> None:
    assert bill_findings(PLAIN, TEN_GIB, 1000) == []


def test_soft_delete_warns_with_the_estimate_and_the_fix() -> None:
    bucket = BucketSettings("logs", 7 * 86_400, False, "STANDARD", None, False)
    [finding] = bill_findings(bucket, TEN_GIB, 1000)
    assert finding.level == "WARN"
    assert "each append keeps the previous copy for 7 days" in finding.detail
    assert "1,000 appends a day to an object of 10.00 GiB" in finding.detail
    assert "70,000.0 GiB-days a day" in finding.detail
    assert "--clear-soft-delete" in finding.fix and "{hour}" in finding.fix


def test_versioning_and_cold_classes_warn() -> None:
    bucket = BucketSettings("logs", 0, True, "COLDLINE", None, False)
    findings = {f.setting: f for f in bill_findings(bucket, None, 100)}
    assert set(findings) == {"object versioning", "storage class"}
    assert "noncurrent" in findings["object versioning"].fix
    assert "90 days" in findings["storage class"].detail


def test_an_objects_own_class_counts_over_the_bucket_default() -> None:
    archived = ObjectSettings("log.pb", GIB, "ARCHIVE", held=False)
    [finding] = bill_findings(PLAIN, archived, 10)
    assert "365 days" in finding.detail
    assert "3,650.0 GiB-days" in finding.detail


def test_retention_policy_and_hold_are_failures() -> None:
    bucket = BucketSettings("logs", 0, False, "STANDARD", 86_400, True)
    held = ObjectSettings("log.pb", GIB, None, held=True)
    findings = bill_findings(bucket, held, 10)
    assert [(f.level, f.setting) for f in findings] == [
        ("FAIL", "retention policy"),
        ("FAIL", "object hold"),
    ]
    assert "locked retention policy of 86400 s" in findings[0].detail


@pytest.mark.parametrize(
    ("stored_gib", "uploads", "composes", "warns"),
    [
        # 100 GiB for $2.00 a month; 2 × 86,400 × 30 operations for $25.92 a month.
        (100, 86_400, 86_400, True),
        # The same archive appended once a minute: 2 × 1,440 × 30 operations, $0.43.
        (100, 1_440, 1_440, False),
        # A young archive: even an append a minute costs more than 1 GiB stored ($0.02).
        (1, 1_440, 1_440, True),
        (0, 0, 0, False),
    ],
)
def test_operations_warn_only_when_they_cost_more_than_storage(
    stored_gib: int, uploads: float, composes: float, warns: bool
) -> None:
    bill = OperationsBill(stored_gib * GIB, uploads, composes)
    assert bill.class_a_per_month == (uploads + composes) * 30
    assert bill.operations_usd == pytest.approx(bill.class_a_per_month / 1000 * 0.005)
    assert bill.storage_usd == pytest.approx(stored_gib * 0.020)
    finding = operations_finding(bill)
    assert (finding is not None) is warns
    if finding is not None:
        assert finding.level == "WARN"
        assert f"{bill.class_a_per_month:,.0f} class A operations a month" in finding.detail
        assert "{partition}" in finding.fix
