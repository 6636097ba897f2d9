"""lmstack: the whole large-language-model stack in one hackable PyTorch codebase."""

from lmstack.errors import LmstackError

__version__ = "0.1.0"
__all__ = ["LmstackError", "__version__"]
