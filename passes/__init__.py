"""Graph passes: each turns a TransformerSpec plus options into plans for the shared engine.

The interface is in base.py (WidthPass, DepthPass). Adding a method is one short file here and one
line in a registry below; `onnxgrow widen --method NAME` and `onnxgrow.widen(..., method=NAME)`
then find it. passes/pad.py is the shortest example. subclone.py holds the math of the subclone
command (onnxgrow/subcloning.py), which shrinks rather than grows and is not a registered pass.
"""

from __future__ import annotations

from .aki import AKI
from .base import DepthPass, Requirement, WidthPass  # noqa: F401
from .fpi import FPI
from .hypercloning import HyperCloning
from .identity import Identity
from .interleave import Interleave
from .pad import Pad
from .stack import Stack

WIDTH_PASSES: dict[str, WidthPass] = {p.name: p for p in (HyperCloning(), FPI(), AKI(), Pad())}
DEPTH_PASSES: dict[str, DepthPass] = {p.name: p for p in (Identity(), Stack(), Interleave())}
