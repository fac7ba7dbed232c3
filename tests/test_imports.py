"""Import direction (docs/ARCHITECTURE.md): the core and the policies never load the optional stack."""

import subprocess
import sys

HEAVY = ("ray", "optuna", "mlflow", "triton")


def test_core_and_policies_import_no_optional_stack():
    code = (
        "import sys, adaptive_kv, adaptive_kv.cache, adaptive_kv.evaluation, adaptive_kv.policies, adaptive_kv.cli;"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]; print(loaded); sys.exit(bool(loaded))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": ""})
    assert result.returncode == 0, result.stdout + result.stderr
