"""protoagg: archive every Kafka message exactly once into GCS, orchestrated by Dagster."""
