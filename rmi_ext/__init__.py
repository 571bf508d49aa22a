"""rmi_ext: fast, memory-lean Region Mutual Information loss for semantic segmentation.

>>> loss = rmi_ext.rmi_loss(logits, labels)          # logits [N, C, H, W], labels [N, H, W]
>>> loss = rmi_ext.rmi_loss(vol_logits, vol_labels, radius=(1, 3, 3), stride=(1, 2, 2))
...                                                  # volumes [N, C, D, H, W], [N, D, H, W]
>>> rmi_ext.backend_info("cpu")["auto"]              # which backend "auto" uses here
"""
from ._config import RMIConfig, make_config
from ._dispatch import auto_backend, backend_info
from .loss import RMILoss, RMITerms, rmi_loss, rmi_loss_terms

__all__ = ["rmi_loss", "rmi_loss_terms", "RMILoss", "RMITerms", "RMIConfig", "make_config",
           "backend_info", "auto_backend"]
__version__ = "0.1.0"
