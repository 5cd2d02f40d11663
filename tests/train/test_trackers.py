"""`--log.wandb` and `--log.mlflow`: offline, the same scalars as metrics.jsonl, the config, resumes."""

import json
import sys

import pytest
from train_helpers import TINY, cli, one_thread, read_metrics, shakespeare_data  # noqa: F401 (fixture)

from scalelm.errors import UserError
from scalelm.train import trackers

ARGS = [*TINY, "--train.max_steps=3", "--train.save_every=3", "--train.eval_every=3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data):
    return shakespeare_data(shared_data, tmp_path_factory.mktemp("data") / "d", chars=60_000)


@pytest.fixture
def offline(monkeypatch):
    """No network, no account, nothing from the user's own tracker settings."""
    for k in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as the trackers should hold it: ``{key: [(step, value), ...]}``."""
    out: dict[str, list] = {}
    for r in records:
        for k, v in trackers.scalars(r).items():
            out.setdefault(k, []).append((r["step"], pytest.approx(v)))
    return out


def test_wandb_offline_logs_the_scalars_and_config_and_a_resume_continues_the_run(
        tmp_path, data, one_thread, offline, monkeypatch):
    wandb = pytest.importorskip("wandb")
    real_init, inits, logged, configs = wandb.init, [], [], []

    def init(**kw):  # the real offline run, its calls recorded
        inits.append(kw)
        run = real_init(**kw)
        real_log = run.log
        monkeypatch.setattr(run, "log", lambda d, *a, **k: (logged.append(dict(d)), real_log(d, *a, **k))[1])
        configs.append(run.config)
        return run

    monkeypatch.setattr(wandb, "init", init)
    out = tmp_path / "run"
    rc, _, se = cli("train", "--data", data, "--out", out, *ARGS, "--log.wandb=true")
    assert rc == 0, se
    saved = json.loads((out / "trackers.json").read_text())["wandb"]
    assert saved["mode"] == "offline" and saved["project"] == "scalelm"
    assert inits[0]["id"] == saved["id"] and inits[0]["mode"] == "offline" and inits[0]["dir"] == str(out)
    assert list((out / "wandb").glob(f"offline-run-*-{saved['id']}/run-{saved['id']}.wandb"))
    got = {}
    for d in logged:
        for k, v in d.items():
            if k != "step":
                got.setdefault(k, []).append((d["step"], v))
    assert got == series(read_metrics(out)) and "loss" in got and "val_loss" in got
    assert configs[0]["train.max_steps"] == 3 and configs[0]["model.n_embd"] == 32

    # resume to step 5: the same wandb run (id, resume="allow"), the new max_steps in its config
    logged.clear()
    rc, _, se = cli("train", "--data", data, "--out", out, *ARGS, "--train.max_steps=5", "--log.wandb=true")
    assert rc == 0, se
    assert inits[1]["id"] == saved["id"] and inits[1]["resume"] == "allow"
    assert json.loads((out / "trackers.json").read_text())["wandb"]["id"] == saved["id"]
    assert sorted({d["step"] for d in logged}) == [4, 5]
    assert configs[1]["train.max_steps"] == 5


def test_mlflow_local_store_holds_metrics_jsonl_and_the_config_and_a_resume_appends(
        tmp_path, data, one_thread, offline, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)  # the default store: ./mlruns of the working directory
    out = tmp_path / "run"
    rc, _, se = cli("train", "--data", data, "--out", out, *ARGS, "--log.mlflow=true", "--log.project=exp1")
    assert rc == 0, se
    saved = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert saved["tracking_uri"] == (here / "mlruns").as_uri() and (here / "mlruns").is_dir()
    client = MlflowClient(saved["tracking_uri"])

    def history() -> dict:
        run = client.get_run(saved["run_id"])
        return {k: [(m.step, m.value) for m in client.get_metric_history(saved["run_id"], k)] for k in run.data.metrics}

    assert history() == series(read_metrics(out))
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "exp1"
    assert run.data.params["train.max_steps"] == "3" and run.data.params["model.n_embd"] == "32"
    assert run.data.params["log.mlflow"] == "true"

    # resumed from elsewhere: the same run in the same store, steps 4-5 appended, the change a tag
    monkeypatch.chdir(tmp_path)
    rc, _, se = cli("train", "--data", data, "--out", out, *ARGS, "--train.max_steps=5", "--log.mlflow=true",
                    "--log.project=exp1")
    assert rc == 0, se
    assert json.loads((out / "trackers.json").read_text())["mlflow"] == saved
    assert not (tmp_path / "mlruns").exists()
    h = history()
    assert h == series(read_metrics(out)) and [s for s, _ in h["loss"]] == [1, 2, 3, 4, 5]
    run = client.get_run(saved["run_id"])
    assert run.data.params["train.max_steps"] == "3" and run.data.tags["config.train.max_steps"] == "5"
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.parametrize("package,flag", [("wandb", "--log.wandb=true"), ("mlflow", "--log.mlflow=true")])
def test_a_missing_package_is_one_line_naming_the_extra(tmp_path, data, one_thread, offline, monkeypatch,
                                                         package, flag):
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    rc, _, se = cli("train", "--data", data, "--out", tmp_path / "run", *ARGS, flag)
    assert rc == 2
    lines = se.strip().splitlines()
    assert len(lines) == 1 and f"log.{package}=true needs the {package} package" in lines[0], se
    assert "scalelm[track]" in lines[0]


def test_wandb_mode_and_mlflow_uri_resolution(tmp_path, offline, monkeypatch):
    assert trackers.wandb_mode("") == "offline"  # WANDB_MODE
    assert trackers.wandb_mode("online") == "online"  # the config wins
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert trackers.wandb_mode("") == "offline"  # no key: never a network failure
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert trackers.wandb_mode("") == "online"
    with pytest.raises(UserError, match="log.wandb_mode must be one of"):
        trackers.wandb_mode("sometimes")
    monkeypatch.chdir(tmp_path)
    assert trackers.mlflow_uri("") == (tmp_path / "mlruns").as_uri()
    assert trackers.mlflow_uri("file:./x") == (tmp_path / "x").as_uri()
    assert trackers.mlflow_uri("y") == (tmp_path / "y").as_uri()
    assert trackers.mlflow_uri("http://host:5000") == "http://host:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///db.sqlite")
    assert trackers.mlflow_uri("") == "sqlite:///db.sqlite"
    assert trackers.flatten({"train": {"lr": 1}, "x": 2}) == {"train.lr": 1, "x": 2}
