"""Google Cloud Storage through google-cloud-storage: a bucket handle, real or emulated."""

from __future__ import annotations

import dagster as dg
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from pydantic import Field

from protoagg_dagster.core.archive_object import validate_template
from protoagg_dagster.core.dead_letters import DEFAULT_TEMPLATE as DEAD_LETTER_TEMPLATE


class GCSResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Where the archive lives."""

    bucket: str = Field(default="logs", description="Bucket holding the archive objects.")
    object_template: str = Field(
        default="log.pb",
        description="Archive object name; may use {topic} {partition} {date} {year} {month} "
        "{day} {hour} (from the batch's first message timestamp).",
    )
    dead_letter_template: str = Field(
        default=DEAD_LETTER_TEMPLATE,
        description="Object receiving messages that cannot be archived (JSON envelopes); same "
        "fields as object_template.",
    )
    emulator_host: str = Field(
        default="",
        description="GCS emulator endpoint (e.g. http://127.0.0.1:4443); empty: real GCS with "
        "Application Default Credentials.",
    )
    project: str | None = Field(default=None, description="Project for the client, if needed.")

    def get_client(self) -> storage.Client:
        if self.emulator_host:
            return storage.Client(
                project=self.project or "protoagg-local",
                credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                client_options={"api_endpoint": self.emulator_host},
            )
        return storage.Client(project=self.project)

    def get_bucket(self) -> storage.Bucket:
        validate_template(self.object_template)
        validate_template(self.dead_letter_template, "PROTOAGG_GCS_DEAD_LETTERS")
        return self.get_client().bucket(self.bucket)
