"""A secured Kafka broker for the tests, as production clusters are: TLS everywhere, logins, ACLs.

One broker per test session (``tests/conftest.py``'s ``secured_kafka``), next to the plain one:
a private CA made at start, SASL_SSL (SCRAM, PLAIN, OAUTHBEARER) and mutual-TLS listeners,
``StandardAuthorizer`` with nothing allowed unless granted. Users: ``archiver`` (SCRAM-SHA-512
and -256, PLAIN, a client certificate, OAUTHBEARER tokens naming it) holds exactly the ACLs
docs/operations.md lists, on topics starting ``sec-``; ``nobody`` logs in and holds none.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.admin._acls import (
    ACL,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    ResourcePattern,
    ResourceType,
)
from kafka.admin._users import UserScramCredentialUpsertion

from protoagg_dagster.core.kafka_client import FIELD_SETTINGS
from protoagg_dagster.core.restore import PROGRESS_TOPIC
from protoagg_dagster.resources import KafkaResource
from protoagg_dagster.services.kafka import KafkaService, SecuredListeners
from tests.support.pki import Pki, make_pki

USER = "archiver"
PASSWORD = "s3cret-Kafka-pw"  # distinctive: the secrets test greps for it
NOBODY = "nobody"
TOPIC_PREFIX = "sec-"
HOST = "127.0.0.1"

# docs/operations.md, "Least privilege": archive (read, describe; no group), restore (write,
# idempotent write, transactional id, its progress topic), produce and create for the CLI.
_PREFIXED = ACLResourcePatternType.PREFIXED
_LITERAL = ACLResourcePatternType.LITERAL
GRANTS: tuple[tuple[ResourceType, str, ACLResourcePatternType, ACLOperation], ...] = (
    (ResourceType.TOPIC, TOPIC_PREFIX, _PREFIXED, ACLOperation.DESCRIBE),
    (ResourceType.TOPIC, TOPIC_PREFIX, _PREFIXED, ACLOperation.READ),
    (ResourceType.TOPIC, TOPIC_PREFIX, _PREFIXED, ACLOperation.WRITE),
    (ResourceType.TOPIC, TOPIC_PREFIX, _PREFIXED, ACLOperation.CREATE),
    (ResourceType.TOPIC, PROGRESS_TOPIC, _LITERAL, ACLOperation.DESCRIBE),
    (ResourceType.TOPIC, PROGRESS_TOPIC, _LITERAL, ACLOperation.READ),
    (ResourceType.TOPIC, PROGRESS_TOPIC, _LITERAL, ACLOperation.WRITE),
    (ResourceType.TOPIC, PROGRESS_TOPIC, _LITERAL, ACLOperation.CREATE),
    (ResourceType.TRANSACTIONAL_ID, "protoagg-restore-", _PREFIXED, ACLOperation.WRITE),
    (ResourceType.TRANSACTIONAL_ID, "protoagg-restore-", _PREFIXED, ACLOperation.DESCRIBE),
    (ResourceType.CLUSTER, "kafka-cluster", _LITERAL, ACLOperation.IDEMPOTENT_WRITE),
)


@dataclass(frozen=True)
class SecuredKafka:
    service: KafkaService
    pki: Pki

    @property
    def admin_bootstrap(self) -> str:
        """PLAINTEXT, a super user: for the tests' own set-up, never for protoagg."""
        return self.service.bootstrap

    @property
    def sasl_bootstrap(self) -> str:
        assert self.service.secured is not None
        return f"{HOST}:{self.service.secured.sasl_port}"

    @property
    def mtls_bootstrap(self) -> str:
        assert self.service.secured is not None
        return f"{HOST}:{self.service.secured.mtls_port}"

    def scram_env(self, user: str = USER, password: str = PASSWORD) -> dict[str, str]:
        """protoagg's settings for a SCRAM-SHA-512 login over SASL_SSL."""
        return {
            "PROTOAGG_KAFKA_BOOTSTRAP": self.sasl_bootstrap,
            "PROTOAGG_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "PROTOAGG_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "PROTOAGG_KAFKA_SASL_USERNAME": user,
            "PROTOAGG_KAFKA_SASL_PASSWORD": password,
            "PROTOAGG_KAFKA_SSL_CAFILE": str(self.pki.ca),
        }

    def mtls_env(self) -> dict[str, str]:
        """protoagg's settings for mutual TLS with the ``archiver`` certificate."""
        return {
            "PROTOAGG_KAFKA_BOOTSTRAP": self.mtls_bootstrap,
            "PROTOAGG_KAFKA_SECURITY_PROTOCOL": "SSL",
            "PROTOAGG_KAFKA_SSL_CAFILE": str(self.pki.ca),
            "PROTOAGG_KAFKA_SSL_CERTFILE": str(self.pki.client_cert),
            "PROTOAGG_KAFKA_SSL_KEYFILE": str(self.pki.client_key),
            "PROTOAGG_KAFKA_SSL_KEY_PASSWORD": self.pki.client_key_password,
        }

    def resource(self, env: dict[str, str], **fields: str) -> KafkaResource:
        """The ``KafkaResource`` protoagg's settings ``env`` describe."""
        values: dict[str, str] = {
            name: env[setting.env] for name, setting in FIELD_SETTINGS.items() if setting.env in env
        }
        return KafkaResource(**{**values, **fields})

    def create_topic(self, topic: str, partitions: int = 1) -> None:
        admin = self.admin()
        try:
            admin.create_topics([NewTopic(topic, partitions, replication_factor=1)])
        finally:
            admin.close()

    def admin(self) -> KafkaAdminClient:
        return KafkaAdminClient(bootstrap_servers=self.admin_bootstrap, request_timeout_ms=10_000)


def unsecured_token(subject: str, lifetime: float = 3600.0) -> str:
    """An unsigned JWT (alg none), which the broker's unsecured-token validator takes."""

    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    now = int(time.time())
    return (
        f"{part({'alg': 'none'})}.{part({'sub': subject, 'iat': now, 'exp': now + int(lifetime)})}."
    )


def start_secured_kafka(state_dir: Path, ports: tuple[int, int, int, int]) -> SecuredKafka:
    """Start (or find running) the secured broker on ``ports``: SASL, mTLS, admin, controller."""
    sasl, mtls, admin_port, controller = ports
    pki_dir = state_dir / "pki"
    pki = make_pki(pki_dir, [HOST, "localhost"], client_cn=USER)
    service = KafkaService(
        state_dir,
        port=admin_port,
        controller_port=controller,
        secured=SecuredListeners(
            sasl_port=sasl,
            mtls_port=mtls,
            keystore=pki.server,
            truststore=pki.ca,
            plain_users=((USER, PASSWORD),),
        ),
    )
    # A broker left running by an earlier session holds an earlier CA: start afresh.
    service.down()
    service.up()
    secured = SecuredKafka(service, pki)
    admin = secured.admin()
    try:
        for mechanism in ("SCRAM-SHA-512", "SCRAM-SHA-256"):
            errors = admin.alter_user_scram_credentials(
                [
                    UserScramCredentialUpsertion(USER, mechanism, PASSWORD),
                    UserScramCredentialUpsertion(NOBODY, mechanism, PASSWORD),
                ]
            )
            assert not any(errors.values()), errors
        acls = [
            ACL(f"User:{USER}", "*", op, ACLPermissionType.ALLOW, ResourcePattern(kind, name, how))
            for kind, name, how, op in GRANTS
        ]
        assert not admin.create_acls(acls)["failed"]
    finally:
        admin.close()
    _await_login(secured)
    return secured


def _await_login(secured: SecuredKafka, timeout: float = 30.0) -> None:
    """Users and ACLs reach the broker through its metadata log: wait until a login works."""
    from kafka import KafkaConsumer

    env = secured.scram_env()
    deadline = time.monotonic() + timeout
    while True:
        try:
            consumer = KafkaConsumer(
                bootstrap_servers=secured.sasl_bootstrap,
                security_protocol="SASL_SSL",
                ssl_cafile=env["PROTOAGG_KAFKA_SSL_CAFILE"],
                sasl_mechanism="SCRAM-SHA-512",
                sasl_plain_username=USER,
                sasl_plain_password=PASSWORD,
                bootstrap_timeout_ms=3000,
            )
            consumer.close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
