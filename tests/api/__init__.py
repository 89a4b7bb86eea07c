"""Helpers for the service tests: an exact in-memory generation and a uvicorn server thread."""
