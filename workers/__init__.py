"""Batched CRD inference workers: read frames from Redis Streams, publish verdicts (`crd work`)."""
