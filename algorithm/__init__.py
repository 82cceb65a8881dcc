"""FetalCLIPSEG for ACOUSLIC-AI: pick the abdominal-circumference frame of a blind-sweep stack and segment it."""

__version__ = "0.1.0"
