"""Shared infrastructure: settings, database, Kafka, outbox relay, consumers, auth, errors, HTTP edge, metrics."""
