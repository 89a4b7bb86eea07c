"""Tests of the offline indexing jobs."""
