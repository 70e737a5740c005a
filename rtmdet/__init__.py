"""rtmdet: fast, faithful RTMDet training machinery.

`rtmdet.ops` holds the ops (assigner, losses, geometry); importing rtmdet never fails
because a native part is missing: `rtmdet.ops.backend_info()` says what is available.
"""
from . import ops
from .checkpoint import load_mmdet_state_dict, load_mmyolo_state_dict, to_mmdet_state_dict
from .loss import head_loss
from .model import RTMDet, RTMDetConfig, normalize_images

__version__ = "0.1.0"
__all__ = ["ops", "RTMDet", "RTMDetConfig", "head_loss", "load_mmdet_state_dict",
           "load_mmyolo_state_dict", "to_mmdet_state_dict", "normalize_images", "__version__"]
