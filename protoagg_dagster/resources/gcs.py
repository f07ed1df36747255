"""Google Cloud Storage through google-cloud-storage: a bucket handle, real or emulated."""

from __future__ import annotations

import dagster as dg
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from pydantic import Field

from protoagg_dagster.core.archive_object import (
    DEFAULT_MAX_OBJECT_BYTES,
    archive_compression,
    validate_template,
)
from protoagg_dagster.core.compression import NONE, Codec
from protoagg_dagster.core.dead_letters import DEFAULT_TEMPLATE as DEAD_LETTER_TEMPLATE
from protoagg_dagster.core.errors import ConfigError, MissingCredentials
from protoagg_dagster.core.storage_bill import BucketSettings, ObjectSettings

NO_CREDENTIALS = (
    "no Google Cloud credentials: set STORAGE_EMULATOR_HOST to use a GCS emulator (local: "
    "http://127.0.0.1:4443), or give protoagg Application Default Credentials for real GCS "
    "(`gcloud auth application-default login`, or GOOGLE_APPLICATION_CREDENTIALS=key.json)"
)


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
    max_object_bytes: int = Field(
        default=DEFAULT_MAX_OBJECT_BYTES,
        description="An object this large continues in the next object of a numbered sequence "
        "(log.pb, log.0001.pb, ...): the batch that would pass it starts the next one.",
        gt=0,
    )
    compression: str = Field(
        default=NONE,
        description="Compression of each appended piece: none, gzip or zstd (one member or "
        "frame per batch, so the object stays one valid .gz/.zst stream).",
    )
    compression_level: int | None = Field(
        default=None, description="gzip 1..9 (default 6), zstd 1..22 (default 3)."
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

    def codec(self) -> Codec:
        return Codec(self.compression, self.compression_level)

    def get_client(self) -> storage.Client:
        if self.emulator_host:
            return storage.Client(
                project=self.project or "protoagg-local",
                credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                client_options={"api_endpoint": self.emulator_host},
            )
        try:
            return storage.Client(project=self.project)
        except auth_exc.DefaultCredentialsError as exc:
            raise MissingCredentials(NO_CREDENTIALS) from exc

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

    def bucket_settings(self) -> BucketSettings:
        """The bucket's soft delete, versioning, class and retention, as GCS reports them."""
        bucket = self.get_client().bucket(self.bucket)
        try:
            bucket.reload()
        except gexc.NotFound as exc:
            raise ConfigError(
                f"GCS bucket {self.bucket!r} does not exist (PROTOAGG_GCS_BUCKET)"
            ) from exc
        soft_delete = bucket.soft_delete_policy.retention_duration_seconds
        return BucketSettings(
            name=self.bucket,
            soft_delete_seconds=int(soft_delete or 0),
            versioning=bool(bucket.versioning_enabled),
            storage_class=bucket.storage_class or "STANDARD",
            retention_seconds=int(bucket.retention_period) if bucket.retention_period else None,
            retention_locked=bool(bucket.retention_policy_locked),
        )

    def object_settings(self, name: str) -> ObjectSettings | None:
        """An archive object's size, storage class, holds and compression; None if it is absent."""
        blob = self.get_client().bucket(self.bucket).get_blob(name)
        if blob is None:
            return None
        return ObjectSettings(
            name=name,
            size_bytes=int(blob.size or 0),
            storage_class=blob.storage_class,
            held=bool(blob.temporary_hold or blob.event_based_hold),
            compression=archive_compression(blob.metadata),
        )
