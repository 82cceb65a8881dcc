"""Data: the replica generator, the release layout, preparation into frames, and what training draws from them."""
