"""The trainer's public names, kept for existing imports (`from rtmdet.train import train`);
the code lives in rtmdet/training/, one job per file."""
from .training import *  # noqa: F401,F403
from .training import __all__  # noqa: F401
