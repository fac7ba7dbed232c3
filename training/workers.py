"""The Ray actor that holds one model copy and does the heavy work: labels, trials, baselines.

The model is loaded once per worker, not per task; validation prefills are captured once per
worker and reused by every trial it runs.
"""

from __future__ import annotations

from typing import Any

import torch

from adaptive_kv.training.calibration import CalibrationRequest
from adaptive_kv.training.labels import RequestLabels, collect_labels
from adaptive_kv.training.objective import TrialConfig, ValidationItem, evaluate_policy, prepare_validation, run_trial


class TrainingWorker:
    """One model, its tokenizer and its validation prefills (wrapped by `ray.remote` in search.py)."""

    def __init__(self, model_name: str, threads: int = 1) -> None:
        from adaptive_kv.models import load_model

        torch.set_num_threads(threads)  # one worker per core: threads would only fight each other
        self.model_name = model_name
        self.model, self.tokenizer = load_model(model_name)
        self._validation: dict[str, list[ValidationItem]] = {}

    def labels(self, requests: list[CalibrationRequest], trial: TrialConfig) -> list[RequestLabels]:
        """Labels of `requests` under the trial's layout and grid."""
        return [collect_labels(self.model, self.tokenizer, r, trial.options(), trial.layout(), trial.stats_config(),
                               trial.label_target())
                for r in requests]

    def scorer_example(self, request: CalibrationRequest, sample_tokens: int, seed: int):
        """The reconstruction scorer's example of one request's context (`training.scorer`)."""
        from adaptive_kv.training.scorer import collect_example

        return collect_example(self.model, self.tokenizer, request.context_ids, request.key,
                               sample_tokens=sample_tokens, seed=seed)

    def predictor_shape(self):
        """The model's shape as a reconstruction predictor reads it."""
        from adaptive_kv.predicted_reconstruction import PredictorShape

        return PredictorShape.of(self.model.config)

    def _items(self, requests: list[CalibrationRequest], trial: TrialConfig) -> list[ValidationItem]:
        key = f"s{trial.sink_tokens}-g{trial.group_size}-{trial.reconstruction}"
        if key not in self._validation:
            self._validation[key] = prepare_validation(self.model, self.tokenizer, requests, trial.stats_config(), trial.layout())
        return self._validation[key]

    def trial(self, trial: TrialConfig, train: list[RequestLabels], valid: list[RequestLabels],
              requests: list[CalibrationRequest], budgets: tuple[float, ...], progress=None) -> dict[str, Any]:
        """Fit and score one trial; returns its controller (config JSON, weights), metrics and loss history.

        `progress` (a Ray queue) receives one item per finished epoch, for the driver's progress bar.
        """
        from adaptive_kv.training.progress import send_tick

        history: list[tuple[int, float, float]] = []

        def on_epoch(*row) -> None:
            history.append(row)
            send_tick(progress, row[0])

        config, net, metrics = run_trial(self.model, trial, train, valid, self._items(requests, trial), budgets,
                                         model_name=self.model_name, on_epoch=on_epoch, tokenizer=self.tokenizer)
        state = {k: v.clone() for k, v in net.state_dict().items()}
        return {"config": config.to_json(), "state": state, "metrics": metrics, "history": history}

    def baselines(self, policies: dict[str, dict], requests: list[CalibrationRequest], trial: TrialConfig,
                  budgets: tuple[float, ...]) -> dict[str, Any]:
        """Static policies scored on the same validation prefills (for the Pareto figure)."""
        from adaptive_kv.policies import get_policy

        out = {}
        for label, options in policies.items():
            policy = get_policy(options["name"], **options.get("options", {}))
            out[label] = evaluate_policy(self.model, self._items(requests, trial), policy.plan, budgets,
                                         trial.objective, self.tokenizer)
        return out

    def score_controller(self, files: dict[str, bytes], requests: list[CalibrationRequest], trial: TrialConfig,
                         budgets: tuple[float, ...]) -> dict[str, Any]:
        """A controller folder's files (name -> bytes) scored like a trial, on the same validation prefills."""
        import tempfile
        from pathlib import Path

        from adaptive_kv.policies import get_policy

        with tempfile.TemporaryDirectory(prefix="akv-controller-") as folder:
            for name, data in files.items():
                (Path(folder) / name).write_bytes(data)
            policy = get_policy("learned", path=folder)
            policy.check_model(self.model.config)  # another model's controller cannot be scored: it is refused
            return evaluate_policy(self.model, self._items(requests, trial), policy.plan, budgets, trial.objective,
                                   self.tokenizer)

    def plans(self, config_json: dict, state: dict, requests: list[CalibrationRequest], trial: TrialConfig,
              budget: float) -> dict[str, str]:
        """The learned plan (JSON) for each validation request at `budget` (heat-maps)."""
        from adaptive_kv.policies.controller.files import ControllerConfig
        from adaptive_kv.policies.learned import Learned

        config = ControllerConfig.from_json(config_json)
        net = config.build()
        net.load_state_dict(state)
        policy = Learned.from_parts(config, net)
        out = {}
        for item in self._items(requests, trial):
            plan = policy.plan(item.captured.stats, budget)
            out[item.request.key] = plan.to_json()
        return out
