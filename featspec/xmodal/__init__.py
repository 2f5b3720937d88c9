"""The cross-modal research app: an event-camera VLM drafts for a video VLM, built on the featspec core.

Nothing in the core imports this package (tests/test_layout.py).
"""
