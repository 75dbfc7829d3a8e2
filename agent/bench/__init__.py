"""Benchmarks, each against its baseline in the same run (`signalgraph bench`, docs/benchmarks.md)."""
