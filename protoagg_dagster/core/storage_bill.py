"""What appending by compose costs on a bucket's settings and in operations: pure estimates.

Every compose replaces the destination object. Soft delete keeps each replaced generation for its
retention (7 days by default), object versioning keeps it until a lifecycle rule deletes it, and
the Nearline/Coldline/Archive classes bill each replaced generation for their minimum storage
duration. A retention policy or a hold forbids replacing the object at all, so every append fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GIB = 1024**3
DAY_SECONDS = 86_400
# Minimum storage durations (days): deleting or replacing earlier bills the rest.
EARLY_DELETION_DAYS = {"NEARLINE": 30, "COLDLINE": 90, "ARCHIVE": 365}
HOURLY_TEMPLATE = "{topic}/{date}/{hour}/{partition}.pb"
# List prices of a Standard bucket in a US region (2026): storage per GiB-month, and class A
# operations (uploads, composes; deletes are free) per 1,000. Other classes and regions differ;
# the comparison of the two, which is what the warning is about, moves much less.
STORAGE_USD_PER_GIB_MONTH = 0.020
CLASS_A_USD_PER_1000 = 0.005
DAYS_PER_MONTH = 30


@dataclass(frozen=True)
class BucketSettings:
    """The bucket settings that decide what an append costs, as read from GCS."""

    name: str
    soft_delete_seconds: int
    versioning: bool
    storage_class: str
    retention_seconds: int | None
    retention_locked: bool


@dataclass(frozen=True)
class ObjectSettings:
    """One archive object's size, class, holds and compression."""

    name: str
    size_bytes: int
    storage_class: str | None
    held: bool
    compression: str = "none"


@dataclass(frozen=True)
class BillFinding:
    """A setting that makes appends expensive (WARN) or impossible (FAIL), and what to do."""

    level: Literal["WARN", "FAIL"]
    setting: str
    detail: str
    fix: str

    def line(self) -> str:
        return f"{self.setting}: {self.detail}. Fix: {self.fix}"


def replaced_copies_gib_days(appends_per_day: float, object_bytes: int, keep_days: float) -> float:
    """GiB-days billed for the generations one day of appends replaces.

    Each append replaces a copy of about the object's size, kept ``keep_days``: a day's appends
    leave ``appends × size × days`` GiB-days, the same as that many GiB stored more, every day.
    """
    return appends_per_day * object_bytes / GIB * keep_days


def expected_appends_per_day(partitions: int, linger_seconds: float) -> float:
    """An upper bound for appends to one shared object when each partition appends per linger.

    Pacing allows about one compose per second per object, so a day has at most 86,400.
    """
    per_partition = DAY_SECONDS / max(linger_seconds, 1.0)
    return min(partitions * per_partition, float(DAY_SECONDS))


def bill_findings(
    bucket: BucketSettings, archive: ObjectSettings | None, appends_per_day: float
) -> list[BillFinding]:
    """The warnings and failures for appending ``appends_per_day`` times to ``archive``."""
    size = archive.size_bytes if archive is not None else 0
    sized = f"at {appends_per_day:,.0f} appends a day to an object of {size / GIB:,.2f} GiB" + (
        f" ({archive.name})" if archive is not None else ""
    )
    smaller = (
        f"or an hourly object template (PROTOAGG_GCS_OBJECT={HOURLY_TEMPLATE}) keeps objects small"
    )
    findings: list[BillFinding] = []
    if bucket.retention_seconds:
        findings.append(
            BillFinding(
                "FAIL",
                "retention policy",
                f"bucket {bucket.name} has a {'locked ' if bucket.retention_locked else ''}"
                f"retention policy of {bucket.retention_seconds} s: an append replaces the "
                "object, which the policy forbids, so every append fails",
                "archive into a bucket without a retention policy and copy finished objects to "
                "the retention bucket",
            )
        )
    if archive is not None and archive.held:
        findings.append(
            BillFinding(
                "FAIL",
                "object hold",
                f"gs://{bucket.name}/{archive.name} is under a hold: appends to it fail",
                "release the hold (gcloud storage objects update --no-temporary-hold "
                "--no-event-based-hold) or point PROTOAGG_GCS_OBJECT at a new object",
            )
        )
    if bucket.soft_delete_seconds > 0:
        days = bucket.soft_delete_seconds / DAY_SECONDS
        extra = replaced_copies_gib_days(appends_per_day, size, days)
        findings.append(
            BillFinding(
                "WARN",
                "soft delete",
                f"each append keeps the previous copy for {days:g} days: {sized} that is about "
                f"{extra:,.1f} GiB-days a day (as if {extra:,.1f} GiB more were stored)",
                f"turn soft delete off for the archive bucket (gcloud storage buckets update "
                f"gs://{bucket.name} --clear-soft-delete), {smaller}",
            )
        )
    if bucket.versioning:
        grows = appends_per_day * size / GIB
        findings.append(
            BillFinding(
                "WARN",
                "object versioning",
                f"every replaced copy is kept as a noncurrent version until a lifecycle rule "
                f"deletes it: {sized} that is about {grows:,.1f} GiB more each day, without end",
                "turn versioning off for the archive bucket, or add a lifecycle rule that "
                "deletes noncurrent versions (daysSinceNoncurrentTime: 1)",
            )
        )
    storage_class = (archive.storage_class if archive else None) or bucket.storage_class
    minimum = EARLY_DELETION_DAYS.get(storage_class.upper())
    if minimum is not None:
        extra = replaced_copies_gib_days(appends_per_day, size, minimum)
        findings.append(
            BillFinding(
                "WARN",
                "storage class",
                f"{storage_class} bills every replaced copy for {minimum} days (early "
                f"deletion): {sized} that is about {extra:,.1f} GiB-days a day",
                "archive in a STANDARD bucket and move finished (e.g. hourly) objects to "
                f"{storage_class} with a lifecycle rule on age",
            )
        )
    return findings


@dataclass(frozen=True)
class OperationsBill:
    """A month of the archive's GCS bill at the current rate: bytes stored and class A operations.

    Each append is one upload of a temporary object and one compose (its delete is free); a run
    that appends several partitions' ranges to one object uploads and composes once for them.
    """

    stored_bytes: int
    uploads_per_day: float
    composes_per_day: float

    @property
    def class_a_per_month(self) -> float:
        return (self.uploads_per_day + self.composes_per_day) * DAYS_PER_MONTH

    @property
    def operations_usd(self) -> float:
        return self.class_a_per_month / 1000 * CLASS_A_USD_PER_1000

    @property
    def storage_usd(self) -> float:
        return self.stored_bytes / GIB * STORAGE_USD_PER_GIB_MONTH

    def line(self) -> str:
        return (
            f"{self.stored_bytes / GIB:,.2f} GiB stored: ${self.storage_usd:,.2f} a month; "
            f"{self.class_a_per_month:,.0f} class A operations a month at the last day's rate "
            f"({self.uploads_per_day:,.0f} uploads + {self.composes_per_day:,.0f} composes a "
            f"day): ${self.operations_usd:,.2f}"
        )


def operations_finding(bill: OperationsBill) -> BillFinding | None:
    """A warning when the month's operations cost more than the month's storage."""
    if bill.operations_usd <= bill.storage_usd:
        return None
    return BillFinding(
        "WARN",
        "operations",
        f"operations cost more than storage: {bill.line()}",
        "append less often and more at a time: a longer PROTOAGG_LINGER_SECONDS, more messages "
        "a run, and objects shared by the partitions of a topic (an object template without "
        "{partition}), whose ranges a run appends in one upload and compose",
    )
