"""The exception tree of protoagg.

Every error the project raises on purpose derives from ``ProtoaggError``, so callers (the CLI, the
Dagster ops) can tell our actionable failures from bugs::

    ProtoaggError
    ├── ConfigError        a setting is missing, malformed or inconsistent; the message names it
    │   ├── MissingCredentials  real GCS without Application Default Credentials
    │   └── AccessRefused       a backend refused our credentials, certificate or permissions
    ├── ServiceError       a local service (Kafka, PostgreSQL, GCS emulator) cannot start or answer
    ├── BackendError       a backend call failed after retries (Kafka, PostgreSQL, GCS)
    │   └── FencedAppendError   another writer appended to the archive object first
    └── ArchiveFormatError a framed archive is corrupt or truncated; says where
"""

from __future__ import annotations


class ProtoaggError(Exception):
    """Root of every error protoagg raises deliberately."""


class ConfigError(ProtoaggError):
    """A setting is missing, malformed or inconsistent with another one."""


class MissingCredentials(ConfigError):
    """Real GCS was asked for but no Application Default Credentials were found."""


class AccessRefused(ConfigError):
    """A backend refused who we are (authentication, TLS) or what we may do (authorization).

    A ``ConfigError``: waiting does not heal it, so nothing retries it; the message names the
    setting or the permission to fix.
    """


class ServiceError(ProtoaggError):
    """A local development service cannot be started, stopped or reached."""


class BackendError(ProtoaggError):
    """A call to Kafka, PostgreSQL or GCS failed and retrying will not help."""


class FencedAppendError(BackendError):
    """The archive object changed under us: another writer appended since we read it."""


class ArchiveFormatError(ProtoaggError):
    """A framed archive does not decode; the message gives the byte offset and record number."""
