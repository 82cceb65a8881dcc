"""The speed benchmark (`python -m training speed`): our pipeline against the paper-style reference path."""
from training.speed.bench import main, run_benchmark
from training.speed.measure import activation_bytes_per_frame, count_flops
from training.speed.oracle import LabelOracle
from training.speed.reference import ReferenceNetwork, ReferenceSearch

__all__ = ["LabelOracle", "ReferenceNetwork", "ReferenceSearch", "activation_bytes_per_frame", "count_flops", "main",
           "run_benchmark"]
