"""`autoassign` is the pure-PyTorch library: importing all of it never pulls in the
orchestration stack (Ray, MLflow, boto3)."""

import subprocess
import sys

IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sys
import autoassign
for info in pkgutil.walk_packages(autoassign.__path__, "autoassign."):
    importlib.import_module(info.name)
forbidden = sorted(m for m in ("ray", "mlflow", "boto3", "botocore") if m in sys.modules)
print(",".join(forbidden))
"""


def test_library_never_imports_the_orchestration_stack():
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERY_MODULE], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"autoassign imported: {result.stdout.strip()}"
