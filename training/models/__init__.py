"""Models: what each training mode builds and trains (modes, baselines), its losses, and its snapshots."""
