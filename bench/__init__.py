"""Benchmark harness of the lesson progress service: ``python -m bench`` (or ``./dev bench``).

Seeds a fresh PostgreSQL with COPY, starts the service as a separate process, drives every
operation from separate load-generator processes, runs the same work through raw asyncpg
and through the seed's naive data flow, and reports ratios measured in one run.
"""
