"""Local development services (Kafka, PostgreSQL, fake-gcs-server) run as background processes.

Used by ``protoagg services`` and by the test fixtures; never imported by the pipeline itself.
"""
