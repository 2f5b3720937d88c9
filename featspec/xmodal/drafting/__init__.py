"""Cross-modal drafting on the core protocol: adapters, the event drafter, the hybrid, aligned pairs."""
