"""Answering a query: the `Searcher` (`searcher`), queries and terms (`query`), cursors,
hybrid keyword+vector fusion, refinement and dedup, applying a calibration, and the query
encoders with their micro-batcher (`query_encoders`, `batcher`)."""
