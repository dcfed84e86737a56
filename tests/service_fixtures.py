"""Fixtures for MySQL, Redis and the S3 test server (owned by the persistence work)."""
