"""The package layout: import-linter's contracts (layers, no cycles), the CLI map and the public face."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """`lint-imports` with the contracts in pyproject.toml: stages import only downwards, no cycles."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("import-linter is not installed: it is part of the [dev] extra")
    r = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout and r.stdout.count("KEPT") >= 2


def test_the_contracts_catch_a_violation(tmp_path):
    """Not a test that cannot fail: a model module importing the trainer breaks the layers contract."""
    import shutil

    pkg = tmp_path / "scalelm"
    shutil.copytree(ROOT / "scalelm", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(pkg / "model" / "gpt.py", "a") as f:
        f.write("\n\ndef _upward():\n    from ..train import optim  # noqa: F401\n")
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0
    assert "scalelm.model.gpt -> scalelm.train.optim" in r.stdout


def test_every_command_module_has_its_parser_and_runner():
    from scalelm.cli import COMMANDS

    for name, (module, _) in COMMANDS.items():
        m = importlib.import_module(module)
        assert callable(getattr(m, f"add_{name}_parser")) and callable(getattr(m, f"run_{name}")), name


def test_public_face():
    import scalelm

    for name in scalelm.__all__:
        assert getattr(scalelm, name) is not None, name
    from scalelm import GPT, Generator, ModelConfig, Trainer, load_model, save_model

    assert GPT.__module__ == "scalelm.model.gpt" and Trainer.__module__ == "scalelm.train.trainer"
    assert Generator.__module__ == "scalelm.generate.generator" and callable(load_model) and callable(save_model)
    assert ModelConfig().n_layer > 0
    with pytest.raises(AttributeError):
        scalelm.not_a_thing  # noqa: B018


def test_light_commands_do_not_import_torch():
    """`scalelm --help` and importing the package stay fast: torch is imported only when needed."""
    r = subprocess.run([sys.executable, "-c", "import sys, scalelm, scalelm.cli, scalelm.runs, scalelm.data.prepare; "
                        "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_a_modules_tests_are_found_from_its_path():
    """The tests of scalelm/<package>/ live in tests/<package>/; tests/ itself holds the tests of the
    top-level modules and the cross-cutting ones (bad input, fuzzing, docs, layout, ...)."""
    packages = {p.name for p in (ROOT / "scalelm").iterdir() if (p / "__init__.py").is_file()}
    folders = {p.parent.relative_to(ROOT / "tests").as_posix() for p in (ROOT / "tests").rglob("test_*.py")}
    assert folders <= packages | {"."}, f"test folders that name no package: {sorted(folders - packages - {'.'})}"
    untested = sorted(p for p in packages if not list((ROOT / "tests" / p).glob("test_*.py")))
    assert untested == [], f"packages with no tests/<package>/: {untested}"
