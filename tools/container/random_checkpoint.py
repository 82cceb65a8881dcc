"""Write a randomly initialised small FetalCLIPSEG checkpoint (for the container test when no weights exist).

    python tools/container/random_checkpoint.py --out DIR/random-small.safetensors [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `algorithm`


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from algorithm.config import ModelConfig
    from algorithm.model.checkpoint import save_checkpoint
    from algorithm.model.fetalclipseg import build_model

    torch.manual_seed(args.seed)
    config = ModelConfig.small()
    model = build_model(config)
    save_checkpoint(args.out, model, model.config, provenance=f"random initialisation (seed {args.seed}) written by "
                    "tools/container/random_checkpoint.py for the container test; not trained")
    print(f"random_checkpoint: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
