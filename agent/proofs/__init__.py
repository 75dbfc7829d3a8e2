"""The training proofs and their data sets and evaluations (`signalgraph proof`, docs/training.md)."""
