"""Offline indexing: read sources, encode them in resumable shards, write store generations."""
