"""Model loading (aliases, local dirs, hub ids) and the target wrapper the engine drives."""

from featspec.models.registry import ALIASES, DEFAULT_TARGET, LoadedModel, load_model
from featspec.models.target import TargetModel, VerifyOutput

__all__ = ["ALIASES", "DEFAULT_TARGET", "LoadedModel", "load_model", "TargetModel", "VerifyOutput"]
