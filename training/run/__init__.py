"""Runs: the training loop, its step and memory plan, torch.distributed, and the recipes that chain them."""
