"""AutoAssign: differentiable label assignment for dense object detection, in plain PyTorch.

The library never imports ray, mlflow or boto3; `orchestration/` adds those around it.
"""

__version__ = "0.1.0"
