"""Benchmarks behind ``props-ray bench`` (see :mod:`props_ray.bench.suite`)."""
