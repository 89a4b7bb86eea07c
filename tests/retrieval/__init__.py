"""Tests of the retrieval core."""
