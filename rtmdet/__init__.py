"""rtmdet: fast, faithful RTMDet training machinery.

`rtmdet.ops` holds the ops (assigner, losses, geometry); importing rtmdet never fails
because a native part is missing: `rtmdet.ops.backend_info()` says what is available.
"""
from . import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
