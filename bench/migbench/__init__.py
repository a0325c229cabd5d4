"""The migration benchmark (``bench/migration_bench.py``), one job per module."""
