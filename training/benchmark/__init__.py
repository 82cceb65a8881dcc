"""Test-set benchmark: run the algorithm on every case of a folder, score it, report clinical agreement.

    python -m training benchmark --cases DIR --out DIR [--ground-truth DIR] [--runner local|docker|grand-challenge]

Runners (one module each, loaded only when used):
  local            `local.LocalRunner`: in this process, the model loaded once (outputs = the CLI's)
  docker           `docker.DockerRunner`: the submission image, one restricted `docker run` per case
  grand-challenge  `grand_challenge.GrandChallengeRunner`: one algorithm job per case through gcapi
The loop they share (resume, failures, timings, progress) is `core.run_benchmark`; case discovery and the
output layout `cases`; scoring and report.md `report`; Bland-Altman `training.scoring.agreement`.

This package imports nothing heavy at import time, so `python -m training.benchmark.docker` (the shared
`docker run` options) stays fast.
"""
from __future__ import annotations

DEFAULT_IMAGE = "acouslic-fetalclipseg:test"  # the tag tools/run_container.sh builds; export.sh builds :latest
RUNNERS = ("local", "docker", "grand-challenge")
