"""Kafka clients: range readers (kafka-python, librdkafka), producers, admin. Imports only core."""
