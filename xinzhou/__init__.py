"""xinzhou (心舟): MiniMax-01/M1/M2 models, kernels, training, RL and serving in one small codebase."""

__version__ = "0.1.0"
