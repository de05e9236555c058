"""Auxiliary training objectives (``model/aux``): VSRN's caption generation, SAEM's angular loss.

See :mod:`itm.models.auxiliary.base` for the slot's interface.
"""

from itm.models.auxiliary.angular import AngularLoss
from itm.models.auxiliary.base import AuxLoss
from itm.models.auxiliary.caption import CaptionLoss

__all__ = ["AngularLoss", "AuxLoss", "CaptionLoss"]
