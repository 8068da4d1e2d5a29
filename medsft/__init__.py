"""medsft: Hydra-configured fine-tuning of causal LMs on medical chain-of-thought (HuatuoGPT-o1 recipe)."""

__version__ = "0.1.0"
