"""rmi_ext: fast, memory-lean Region Mutual Information loss for semantic segmentation.

>>> loss = rmi_ext.rmi_loss(logits, labels)          # logits [N, C, H, W], labels [N, H, W]
>>> loss = rmi_ext.rmi_loss(vol_logits, vol_labels, radius=(1, 3, 3), stride=(1, 2, 2))
...                                                  # volumes [N, C, D, H, W], [N, D, H, W]
>>> loss = rmi_ext.rmi_loss(logits, soft_target)     # float target [N, C, H, W] in [0, 1]
>>> d = rmi_ext.region_mi(student, teacher)          # RMI between two maps, both differentiable
>>> rmi_ext.backend_info("cpu")["auto"]              # which backend "auto" uses here
"""
from ._config import RMIConfig, make_config
from ._dispatch import auto_backend, backend_info
from .loss import RMILoss, RMITerms, region_mi, rmi_loss, rmi_loss_terms

__all__ = ["rmi_loss", "rmi_loss_terms", "region_mi", "RMILoss", "RMITerms", "RMIConfig", "make_config",
           "backend_info", "auto_backend"]
__version__ = "0.1.0"
