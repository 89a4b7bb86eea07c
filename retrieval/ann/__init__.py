"""The FAISS engines: choosing and building an index (`engines`), the on-disk IVF (`ondisk`)
and its coarse quantiser (`coarse`), tuning against the exact oracle (`tuning`) and
chunked row scans that keep memory bounded (`rowscan`)."""
