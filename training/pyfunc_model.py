"""The registered controller as an MLflow pyfunc (logged as code, so loading unpickles nothing).

Input: one row per request with `features` (JSON: L x H x F nested list), `feature_names` (JSON
list: the controller's own names, `controller.json`; reconstruction features under their exact names
whichever source the controller was trained on), `seq_len`, `budget`, `head_dim`, `dtype_bytes`.
Output: one `plan` column of Plan JSON.
"""

from __future__ import annotations

import json

import mlflow.pyfunc
from mlflow.models import set_model


class ControllerModel(mlflow.pyfunc.PythonModel):
    """Statistics + budget in, plan JSON out, using the controller files in the `controller` artifact."""

    def load_context(self, context) -> None:
        """Load the controller files."""
        from adaptive_kv.policies import get_policy

        self.policy = get_policy("learned", path=context.artifacts["controller"], reconstruction="exact")

    def predict(self, context, model_input, params=None):
        """A DataFrame with one `plan` (JSON) per input row."""
        import pandas as pd
        import torch

        from adaptive_kv.stats import AttentionStats

        plans = []
        for row in model_input.to_dict("records"):
            features = torch.tensor(json.loads(row["features"]), dtype=torch.float32)
            stats = AttentionStats(features, {}, int(row["seq_len"]), tuple(json.loads(row["feature_names"])),
                                   head_dim=int(row["head_dim"]), dtype_bytes=int(row["dtype_bytes"]))
            plan = self.policy.plan(stats, float(row["budget"]))
            plans.append(plan.to_json())
        return pd.DataFrame({"plan": plans})


set_model(ControllerModel())
