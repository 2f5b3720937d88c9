"""The two VLMs of the cross-modal app (mini or real): video target, event drafter, their parts."""
