"""Offline research side: replica data, metrics, training and test-set benchmarks. Imports algorithm/."""
