"""Google Cloud Storage through google-cloud-storage: a bucket handle, real or emulated."""

from __future__ import annotations

import dagster as dg
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from pydantic import Field

from protoagg_dagster.core.archive_object import validate_template
from protoagg_dagster.core.dead_letters import DEFAULT_TEMPLATE as DEAD_LETTER_TEMPLATE
from protoagg_dagster.core.errors import ConfigError


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
    create_bucket: bool = Field(
        default=False, description="Create the bucket if it does not exist (else: an error)."
    )

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

    def writable_bucket(self) -> storage.Bucket:
        """The bucket, checked to exist (or created, if ``create_bucket``) and to be reachable."""
        bucket = self.get_bucket()
        try:
            if bucket.exists():
                return bucket
            if not self.create_bucket:
                raise ConfigError(
                    f"GCS bucket {self.bucket!r} does not exist: create it, fix "
                    "PROTOAGG_GCS_BUCKET, or set PROTOAGG_GCS_CREATE_BUCKET=true to let protoagg "
                    "create it"
                )
            return self.get_client().create_bucket(self.bucket)
        except gexc.Forbidden as exc:
            raise ConfigError(
                f"no permission on GCS bucket {self.bucket!r} for these credentials (needs "
                f"roles/storage.objectAdmin): {exc.message}"
            ) from exc
