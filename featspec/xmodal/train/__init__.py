"""Training of the cross-modal app on the core training loop: the minis, adapters, the target's head."""
