"""The cross-modal world: procedural clips, the event simulator, questions and answers."""
