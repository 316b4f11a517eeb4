"""The test suite: real files, real models, a real Redis/Valkey server."""
