"""The benchmarks of `make bench` (bench/run_all.py) and the load generator they share with the soak."""
