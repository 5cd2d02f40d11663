"""Experiment trackers beside ``metrics.jsonl``: Weights & Biases (``log.wandb``) and MLflow (``log.mlflow``).

Each logs the same scalars as TensorBoard (every numeric field of every ``metrics.jsonl`` record,
against ``step``) and the run's resolved config flattened to ``section.key``. A package is imported
only when its tracker is on. Which tracker run a run directory writes to is kept in
``RUN_DIR/trackers.json``, so a resumed run continues the same wandb run (its ``id``, ``resume="allow"``)
and the same MLflow run (its run id, in the store it was created in). Only the main rank makes these.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import time
import uuid
from pathlib import Path
from typing import Optional

from ..checkpoint.names import TRACKERS
from ..errors import UserError
from ..fileio import atomic_write_text

DEFAULT_PROJECT = "scalelm"
WANDB_MODES = ("online", "offline", "disabled")
MLFLOW_PARAMS_PER_CALL = 100  # MLflow's limit on params in one log_batch


def flatten(config: dict) -> dict:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (the keys as ``--section.key`` spells them)."""
    out = {}
    for section, values in config.items():
        if isinstance(values, dict):
            for k, v in values.items():
                out[f"{section}.{k}"] = v
        else:
            out[section] = values
    return out


def scalars(record: dict) -> dict:
    """The record's finite numbers except ``step`` (what TensorBoard gets too)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _need(package: str, key: str):
    """Import a tracker's package, or one line saying what to install."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        pip = {"wandb": "wandb", "mlflow": "mlflow-skinny"}[package]
        raise UserError(f"log.{key}=true needs the {package} package: pip install {pip} "
                        f"(or pip install 'scalelm[track]')") from None


def wandb_mode(given: str) -> str:
    """``log.wandb_mode``, else ``WANDB_MODE``, else online where an API key is set up (``WANDB_API_KEY``
    or a ``wandb login`` entry in ~/.netrc), else offline: a run never fails for want of a network or
    an account, and ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later."""
    mode = given or os.environ.get("WANDB_MODE", "")
    if not mode:
        mode = "online" if os.environ.get("WANDB_API_KEY") or _netrc_login() else "offline"
    if mode == "dryrun":  # wandb's old name for offline
        mode = "offline"
    if mode not in WANDB_MODES:
        raise UserError(f"log.wandb_mode must be one of {', '.join(WANDB_MODES)} (or empty: WANDB_MODE, "
                        f"else online with an API key, else offline), got {mode!r}")
    return mode


def _netrc_login() -> bool:
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def mlflow_uri(given: str) -> str:
    """``log.mlflow_tracking_uri``, else ``MLFLOW_TRACKING_URI``, else ``./mlruns`` of the working directory
    (MLflow's own default, where ``mlflow ui`` looks), made absolute so a resume from elsewhere finds it."""
    uri = given or os.environ.get("MLFLOW_TRACKING_URI", "") or "mlruns"
    if "://" not in uri and not uri.startswith("file:"):  # a plain path: a local file store
        uri = Path(uri).resolve().as_uri()
    elif uri.startswith("file:") and not uri.startswith("file://"):  # file:./mlruns, file:mlruns
        uri = Path(uri[len("file:"):]).resolve().as_uri()
    return uri


class Trackers:
    """The enabled trackers of one run; :meth:`start` opens (or, resumed, reopens) their runs."""

    def __init__(self, run_dir: Path, log_cfg, config: dict):
        self.run_dir, self.cfg, self.config = Path(run_dir), log_cfg, flatten(config)
        self.path = self.run_dir / TRACKERS
        self.wandb = None  # the wandb run
        self.mlflow = None  # (MlflowClient, run id)
        # import now, so a missing package stops the run before it trains, not at its first log line
        self._wandb_mod = _need("wandb", "wandb") if log_cfg.wandb else None
        self._mlflow_mod = _need("mlflow", "mlflow") if log_cfg.mlflow else None
        self.mode = wandb_mode(log_cfg.wandb_mode) if log_cfg.wandb else None

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.wandb or self.cfg.mlflow)

    def start(self, resumed_at: Optional[int]) -> None:
        """Open the tracker runs: those recorded in ``trackers.json`` when resuming, new ones otherwise."""
        saved = {}
        if resumed_at is not None and self.path.is_file():
            try:
                saved = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                saved = {}
        record = {}
        if self.cfg.wandb:
            record["wandb"] = self._start_wandb(saved.get("wandb"))
        if self.cfg.mlflow:
            record["mlflow"] = self._start_mlflow(saved.get("mlflow"), resumed_at)
        atomic_write_text(self.path, json.dumps({**saved, **record}, indent=2) + "\n")

    def _start_wandb(self, saved: Optional[dict]) -> dict:
        wandb = self._wandb_mod
        run_id = saved["id"] if saved else uuid.uuid4().hex[:12]
        project = (saved or {}).get("project") or self.cfg.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        # RUN_DIR/wandb/ keeps a run's files with it; WANDB_DIR, where set, is the user's choice
        wandb_dir = None if os.environ.get("WANDB_DIR") else str(self.run_dir)
        # console "off": scalelm's own stderr is the log; wrapping sys.stdout/stderr would fight the
        # progress bar and anything (tests, notebooks) that redirects them
        run = wandb.init(project=project, name=self.run_dir.name, id=run_id, resume="allow", mode=self.mode,
                         dir=wandb_dir, settings=wandb.Settings(console="off"))
        # a resume changes some keys (lr, max_steps): the run's config shows the values now in force
        run.config.update(self.config, allow_val_change=True)
        # x axis: the training step, logged as a metric; wandb's own step only ever grows, and a resumed
        # run redoes the steps after its checkpoint, which wandb would otherwise drop
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        self.wandb = run
        return {"id": run_id, "project": project, "mode": self.mode}

    def _start_mlflow(self, saved: Optional[dict], resumed_at: Optional[int]) -> dict:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        uri = saved["tracking_uri"] if saved and not self.cfg.mlflow_tracking_uri else mlflow_uri(
            self.cfg.mlflow_tracking_uri)
        if uri.startswith("file:"):
            # MLflow 3 refuses a file store unless asked; a local ./mlruns needing no server or database
            # is what log.mlflow offers, so ask (a user's own setting stays as it is)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=uri)
        run_id = saved.get("run_id") if saved and saved.get("tracking_uri") == uri else None
        if run_id is not None:
            try:
                client.get_run(run_id)
            except Exception:  # the store was moved or wiped: start a new run there
                run_id = None
        name = (saved or {}).get("experiment") or self.cfg.project or os.environ.get(
            "MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        params = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in self.config.items()}
        if run_id is None:
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
            run_id = client.create_run(exp_id, run_name=self.run_dir.name,
                                       tags={"scalelm.run_dir": str(self.run_dir.resolve())}).info.run_id
            todo, tags = params, {}
        else:
            client.update_run(run_id, status="RUNNING")
            # params never change in MLflow: a resume adds new keys and records changed values as tags
            # config.KEY (the value in force since that resume)
            have = client.get_run(run_id).data.params
            todo = {k: v for k, v in params.items() if k not in have}
            tags = {f"config.{k}": v for k, v in params.items() if k in have and have[k] != v}
            tags["scalelm.resumed_at_step"] = str(resumed_at)
        items = [Param(k, v) for k, v in todo.items()]
        for i in range(0, len(items), MLFLOW_PARAMS_PER_CALL):
            client.log_batch(run_id, params=items[i:i + MLFLOW_PARAMS_PER_CALL])
        if tags:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.mlflow = (client, run_id)
        return {"run_id": run_id, "tracking_uri": uri, "experiment": name}

    def log(self, record: dict) -> None:
        values = scalars(record)
        if not values:
            return
        step = int(record["step"])
        if self.wandb is not None:
            self.wandb.log({"step": step, **values})
        if self.mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self.mlflow
            ms = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.mlflow is not None:
            client, run_id = self.mlflow
            client.set_terminated(run_id)
            self.mlflow = None
