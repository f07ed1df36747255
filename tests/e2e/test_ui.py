"""The Dagster UI end to end: a real webserver and daemon on loopback, driven in headless Chromium.

One deployment serves the whole module (its tests run in file order and build on each other):

1. the UI shows the code location loaded, the job, the sensor (running), the schedules and the
   archive asset; a range launched from the job's Launchpad archives it;
2. ``protoagg backfill`` queues the next offsets as runs through the same webserver's GraphQL API,
   shows progress and archives them; a second backfill over them appends nothing;
3. screenshots of the asset's metadata plots and of the runs page go to
   ``.protoagg/screenshots`` (``PROTOAGG_SCREENSHOT_DIR=docs/img`` refreshes the README's).

The sensor is running but its batch size and linger are out of reach, so the runs are the
Launchpad's and the backfill's. Chromium is Debian's (``/usr/bin/chromium``; scripts/test installs
it); without it the tests fail.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError
from psycopg import sql

from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from protoagg_dagster.resources.settings import ArchiverSettings
from tests.conftest import ROOT, Services
from tests.helpers import Stack, archive, create_topic, log_value, produce
from tests.support.dagster_web import DagsterWeb, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# The webserver asks a localhost visitor once to join its community; answered "skip" up front.
SKIP_COMMUNITY_DIALOG = "window.localStorage.setItem('communityNux', JSON.stringify('1'))"
# Refresh the README's pictures with PROTOAGG_SCREENSHOT_DIR=docs/img scripts/test -k ui.
SCREENSHOTS = Path(os.environ.get("PROTOAGG_SCREENSHOT_DIR", ROOT / ".protoagg" / "screenshots"))
JOB = "archive_kafka_batch"
MESSAGES = 150
UI_END = 50  # the Launchpad archives [0, 50)
CLI_BATCH = 25  # the backfill archives [50, 150) in runs of 25 offsets
RUN_DEADLINE = 90.0
IN_PROGRESS = {"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"}
FAILED = {"FAILURE", "CANCELED"}

RUN_STATUS_QUERY = """
query RunStatus($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status } }
}
"""


@dataclass
class Deployment:
    web: DagsterWeb
    stack: Stack
    topic: str
    env: dict[str, str]
    log_ids: list[str]

    def archived_ids(self) -> list[str]:
        records, _ = archive(self.stack)
        return [record.log_id for record in records]

    def object_size(self) -> int:
        blob = self.stack.gcs.get_bucket().get_blob(self.stack.gcs.object_template)
        assert blob is not None and blob.size is not None
        return int(blob.size)

    def runs(self) -> list[dict[str, Any]]:
        return self.web.runs(JOB)

    def wait_for_run(self, run_id: str) -> str:
        """Wait until the run has finished; fail early (with the daemon's log) if it failed."""
        status = ""

        def finished() -> bool:
            nonlocal status
            run = self.web.graphql(RUN_STATUS_QUERY, {"runId": run_id})["runOrError"]
            assert run["__typename"] == "Run", run
            status = run["status"]
            assert status not in FAILED, f"run {run_id} ended {status}\n" + (
                self.web.log_tail("daemon")
            )
            return status not in IN_PROGRESS

        wait_until(f"run {run_id} has finished", finished, RUN_DEADLINE, self.web.check_alive)
        return status

    def wait_until_idle(self) -> None:
        """No run of the job queued or in progress (the sensor may have relaunched a range)."""
        wait_until(
            "no archive run is queued or in progress",
            lambda: not [r for r in self.runs() if r["status"] in IN_PROGRESS],
            RUN_DEADLINE,
            self.web.check_alive,
        )


@pytest.fixture(scope="module")
def database(services: Services) -> Iterator[str]:
    """A fresh PostgreSQL database for the module's deployment."""
    name = f"t_ui_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(services.postgres_admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield services.postgres_admin_dsn.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(services.postgres_admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="module")
def deployment(
    services: Services, database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """Webserver and daemon on a fresh DAGSTER_HOME, over a new topic holding 150 messages."""
    unique = uuid.uuid4().hex[:10]
    topic = f"logs-{unique}"
    env = {
        "PROTOAGG_KAFKA_BOOTSTRAP": services.kafka_bootstrap,
        "PROTOAGG_TOPICS": topic,
        "PROTOAGG_POSTGRES_DSN": database,
        "PROTOAGG_GCS_BUCKET": services.bucket,
        "PROTOAGG_GCS_OBJECT": f"{unique}/log.pb",
        "STORAGE_EMULATOR_HOST": services.gcs_url,
        # Out of reach: the sensor ticks and observes lag but launches nothing by itself.
        "PROTOAGG_BATCH_SIZE": "100000",
        "PROTOAGG_LINGER_SECONDS": "3600",
    }
    stack = Stack(
        kafka=KafkaResource(bootstrap_servers=services.kafka_bootstrap, topics=topic),
        postgres=PostgresResource(dsn=database),
        gcs=GCSResource(
            bucket=services.bucket,
            object_template=env["PROTOAGG_GCS_OBJECT"],
            emulator_host=services.gcs_url,
        ),
        archiver=ArchiverSettings(batch_size=100000, linger_seconds=3600),
    )
    log_ids = [str(uuid.uuid4()) for _ in range(MESSAGES)]
    create_topic(stack.kafka, topic)
    produce(
        stack.kafka,
        topic,
        [log_value(log_id, message=f"message {i}", second=i) for i, log_id in enumerate(log_ids)],
    )
    web = DagsterWeb(home=tmp_path_factory.mktemp("dagster_home"), env=env)
    started = time.monotonic()
    web.start()
    try:
        loaded = web.wait_loaded()
        print(f"\nDagster at {web.url}: code location loaded after {loaded:.1f} s")
        yield Deployment(web, stack, topic, env, log_ids)
    finally:
        stopping = time.monotonic()
        web.stop()
        print(
            f"\nDagster stopped in {time.monotonic() - stopping:.1f} s "
            f"(up {stopping - started:.1f} s); logs in {web.home}"
        )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), (
        f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium); "
        "scripts/test does it when run as root"
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser, deployment: Deployment, tmp_path: Path) -> Iterator[Page]:
    """A fresh browser context on the deployment; its last view is kept as ``last-page.png``."""
    context = browser.new_context(
        base_url=deployment.web.url, viewport={"width": 1400, "height": 900}
    )
    context.add_init_script(SKIP_COMMUNITY_DIALOG)
    context.set_default_timeout(30_000)
    # Assertions wait as long as actions: Playwright's own 5 s for `expect` failed a clean run
    # on three workers, with the locations page still "Loading…" (the UI waits on the code
    # server, which shares two busy cores).
    expect.set_options(timeout=30_000)
    page = context.new_page()
    try:
        yield page
    finally:
        with suppress(PlaywrightError):
            page.screenshot(path=str(tmp_path / "last-page.png"))
            print(f"\nlast page {page.url}: {tmp_path / 'last-page.png'}")
        context.close()


def switch_in_row(page: Page, label: str) -> bool:
    """Whether the (visually restyled) checkbox of the details row ``label`` is checked."""
    row = page.locator("tr", has=page.get_by_text(label, exact=True))
    checkbox = row.locator("input[type=checkbox]")
    checkbox.wait_for(state="attached")
    return bool(checkbox.evaluate("box => box.checked"))


def launchpad_yaml(topic: str, start: int, end: int) -> str:
    """The run config of README's "Running it from Dagster" section, for one range."""
    return (
        "ops:\n"
        "  archive:\n"
        "    config:\n"
        "      ranges:\n"
        f"        - {{topic: {topic}, partition: 0, start_offset: {start}, end_offset: {end}}}\n"
    )


def test_the_ui_shows_the_deployment_and_archives_a_range_launched_from_the_launchpad(
    page: Page, deployment: Deployment
) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()

    # The code location, loaded without errors.
    page.goto("/locations")
    expect(page.locator("a[href='/locations/protoagg/']")).to_be_visible()
    expect(page.get_by_text("1 code location", exact=True)).to_be_visible()
    expect(page.get_by_text(re.compile(r"^Loaded"))).to_be_visible()
    expect(page.get_by_text(re.compile("error|failed", re.IGNORECASE))).to_have_count(0)
    # What it defines: two asset groups (the archive, the Iceberg tables); six jobs (archive,
    # upkeep, run retention, restore, the Iceberg tables and their upkeep); three schedules; two
    # sensors (the archive's, the Iceberg days').
    for kind, count in (("asset_group", 2), ("job", 6), ("schedule", 3), ("sensors", 2)):
        expect(page.get_by_role("link", name=f"{kind} {count}", exact=True)).to_be_visible()

    # The archive job, its one op.
    page.goto(f"/locations/protoagg/jobs/{JOB}")
    description = "Archive offset ranges [start, end) of Kafka partitions"
    expect(page.get_by_text(description)).to_be_visible()
    expect(page.get_by_text("archive", exact=True).first).to_be_visible()

    # The schedule, running.
    page.goto("/locations/protoagg/schedules/archive_maintenance")
    expect(page.get_by_text("(17 * * * *)")).to_be_visible()
    expect(page.get_by_role("link", name="maintain_archive")).to_be_visible()
    assert switch_in_row(page, "Running"), "schedule archive_maintenance is not running"

    # The archive asset, from the asset catalog.
    page.goto("/assets")
    page.get_by_role("link", name="kafka_archive").first.click()
    page.wait_for_url(re.compile(r"/assets/kafka_archive"))
    expect(page.get_by_text("Every Kafka message of the archived topics")).to_be_visible()

    # The sensor, running and ticking (its ticks request nothing: batch size and linger are out
    # of reach).
    page.goto("/locations/protoagg/sensors/kafka_offsets_sensor")
    expect(page.get_by_role("link", name=JOB).first).to_be_visible()
    assert switch_in_row(page, "Running"), "sensor kafka_offsets_sensor is not running"
    expect(page.get_by_text("0 runs requested").first).to_be_visible(timeout=60_000)
    timings["pages checked"] = time.monotonic() - started

    # A range launched from the job's Launchpad, with the README's run config.
    page.goto(f"/locations/protoagg/jobs/{JOB}")
    page.get_by_text("Launchpad", exact=True).click()
    page.locator(".CodeMirror").wait_for()
    page.evaluate(
        "text => document.querySelector('.CodeMirror').CodeMirror.setValue(text)",
        launchpad_yaml(deployment.topic, 0, UI_END),
    )
    expect(page.get_by_text("No errors", exact=True)).to_be_visible()
    page.get_by_role("button", name="Launch Run").click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
    run_id = page.url.rstrip("/").rsplit("/", 1)[-1]
    assert deployment.wait_for_run(run_id) == "SUCCESS"
    expect(page.get_by_text("Success", exact=True).filter(visible=True).first).to_be_visible()
    expect(page.get_by_text("RUN_SUCCESS").filter(visible=True).first).to_be_visible()
    timings["launchpad run succeeded"] = time.monotonic() - started

    assert deployment.archived_ids() == deployment.log_ids[:UI_END]
    deployment.wait_until_idle()
    # Whatever else ran meanwhile appended nothing.
    assert deployment.archived_ids() == deployment.log_ids[:UI_END]
    others = [r for r in deployment.runs() if r["runId"] != run_id]
    print(
        "\n"
        + ", ".join(f"{k} after {v:.1f} s" for k, v in timings.items())
        + f"; other runs: {[(r['runId'][:8], r['status'], tags_of(r)) for r in others]}"
    )


def tags_of(run: dict[str, Any]) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in run["tags"] if not tag["key"].startswith(".")}


def range_start(range_tag: str) -> int:
    return int(range_tag.rsplit("-", 2)[1])


def backfill(deployment: Deployment, start: int, end: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "protoagg_dagster.cli.main",
            "backfill",
            "--topic",
            deployment.topic,
            "--partition",
            "0",
            "--from-offset",
            str(start),
            "--to-offset",
            str(end),
            "--max-batch-messages",
            str(CLI_BATCH),
            "--dagster",
            deployment.web.address,
        ],
        cwd=ROOT,
        env={**os.environ, **deployment.env},
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )


def test_the_backfill_command_queues_runs_through_the_webserver_and_skips_archived_offsets(
    deployment: Deployment,
) -> None:
    assert deployment.archived_ids() == deployment.log_ids[:UI_END], (
        "the Launchpad test archives offsets 0..50 first; run the whole module"
    )
    started = time.monotonic()
    first = backfill(deployment, UI_END, MESSAGES)
    took = time.monotonic() - started
    output = f"stdout:\n{first.stdout}\nstderr:\n{first.stderr}"
    assert first.returncode == 0, output
    assert "queued 4 runs" in first.stdout, output
    # The progress bar (on stderr): runs done of total, messages per second.
    assert "runs 4/4, failed 0" in first.stderr, output
    assert "msg/s" in first.stderr, output
    label = re.search(r"protoagg/backfill=(\w+)", first.stdout)
    assert label is not None, output

    queued = [r for r in deployment.runs() if tags_of(r).get("protoagg/backfill") == label[1]]
    assert sorted((tags_of(r)["protoagg/range"] for r in queued), key=range_start) == [
        f"{deployment.topic}-0-{start}-{start + CLI_BATCH}"
        for start in range(UI_END, MESSAGES, CLI_BATCH)
    ]
    assert {r["status"] for r in queued} == {"SUCCESS"}
    assert deployment.archived_ids() == deployment.log_ids
    size = deployment.object_size()

    runs_before = len(deployment.runs())
    again = backfill(deployment, UI_END, MESSAGES)
    output = f"stdout:\n{again.stdout}\nstderr:\n{again.stderr}"
    assert again.returncode == 0, output
    assert "already archived" in again.stdout, output
    assert "queued" not in again.stdout, output
    assert len(deployment.runs()) == runs_before
    assert deployment.object_size() == size
    assert deployment.archived_ids() == deployment.log_ids
    print(
        f"\nbackfill of {MESSAGES - UI_END} offsets in {len(queued)} runs took {took:.1f} s; "
        f"the repeat took {time.monotonic() - started - took:.1f} s\n{first.stdout}{again.stdout}"
    )


def test_screenshots_of_the_asset_plots_and_the_runs(page: Page, deployment: Deployment) -> None:
    assert deployment.archived_ids() == deployment.log_ids, (
        "the Launchpad and backfill tests archive every message first; run the whole module"
    )
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1400, "height": 1500})

    # The asset's metadata, as plots over time: one point per batch (and per sensor tick for lag).
    page.goto("/assets/kafka_archive")
    page.get_by_role("button", name="Plots").click()
    for key in ("records_appended", "messages_per_second", "lag_messages"):
        expect(page.get_by_text(key, exact=True)).to_be_visible()
    wait_until(
        "the plots are drawn",
        lambda: page.locator("canvas").count() >= 10,
        deadline_s=30,
    )
    page.get_by_text("Metadata", exact=True).evaluate("e => e.scrollIntoView({block: 'start'})")
    plots = SCREENSHOTS / "asset-plots.png"
    page.screenshot(path=str(plots), animations="disabled")

    # The runs: the Launchpad's and the backfill's, with their range tags.
    page.set_viewport_size({"width": 1400, "height": 850})
    page.goto("/runs")
    expect(page.get_by_text("protoagg/backfill", exact=False).first).to_be_visible()
    expect(page.get_by_text("Success", exact=True)).not_to_have_count(0)
    runs = SCREENSHOTS / "runs.png"
    page.screenshot(path=str(runs), animations="disabled")
    print(f"\nscreenshots: {plots} {runs}")
