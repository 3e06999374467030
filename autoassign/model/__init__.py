"""The AutoAssign detector: ResNet backbone, FPN, head, loss and inference."""

from autoassign.model.detector import AutoAssign, build_detector

__all__ = ["AutoAssign", "build_detector"]
