"""APT models: HLBD data, the autopoietic transformer, training backends, verification.

Importing this package stays light: torch and the heavy optional stacks are imported by the
submodules that need them.
"""

from apt_model.errors import AptError, CheckpointError, ConfigError, DataError

__version__ = "0.1.0"

__all__ = ["AptError", "CheckpointError", "ConfigError", "DataError", "__version__"]
