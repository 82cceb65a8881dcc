"""Tooling that is not pytest: the container test, the GPU check, the output checker, the comparison with the
challenge's own evaluation code."""
