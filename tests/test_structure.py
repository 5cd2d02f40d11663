"""One of each, kept so by grep (issue 27's "done when"): the Trainer is built by the recipe runner
(and the demo), file names are spelled in the checkpoint package, one Jinja compiler, one tokenizer
loader, and no duck typing in the Trainer."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "scalelm"


def sources():
    for p in sorted(ROOT.rglob("*.py")):
        yield p.relative_to(ROOT).as_posix(), p.read_text()


def where(pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [name for name, text in sources() if any(rx.search(line) for line in text.splitlines()
                                                    if not line.lstrip().startswith("#"))]


def test_the_trainer_is_constructed_by_the_recipe_runner_and_the_demo_only():
    assert where(r"(?<![\w.])Trainer\(") == ["demo.py", "train/recipe.py"]


def test_every_training_command_is_a_recipe():
    from scalelm.compress.distill import DistillRecipe
    from scalelm.tasks.classify.train import ClassifyRecipe
    from scalelm.tasks.sft.train import SFTRecipe
    from scalelm.tasks.translate.train import TranslateRecipe
    from scalelm.tasks.translate.train_encdec import EncDecTranslateRecipe
    from scalelm.train.recipe import Recipe
    from scalelm.train.run import PretrainRecipe

    for r in (PretrainRecipe, ClassifyRecipe, SFTRecipe, TranslateRecipe, EncDecTranslateRecipe, DistillRecipe):
        assert issubclass(r, Recipe)
    assert where(r"\bopen_run\(|\breport_run\(") == ["train/recipe.py"]  # the run harness exists once


def test_checkpoint_file_names_are_spelled_in_at_most_two_modules():
    names = r'"(model\.safetensors|config\.json|tokenizer\.json|head\.safetensors|optimizer\.safetensors|' \
            r'adapter\.safetensors|manifest\.json|state\.json|task\.json|run\.json)"'
    found = [m for m in where(names) if m != "data/sources.py"]  # there: a Hugging Face datasets file
    assert len(found) <= 2 and "checkpoint/names.py" in found, found


def test_one_jinja_compiler_one_tokenizer_loader():
    assert where(r"SandboxedEnvironment\(|jinja2\.Environment\(|\bEnvironment\(") == ["data/chat_template.py"]
    assert where(r"^\s*def load_tokenizer\(") == ["data/tokenizer.py"]


def test_no_duck_typing_in_the_trainer():
    text = (ROOT / "train" / "trainer.py").read_text()
    assert "hasattr(" not in text
    assert not re.search(r"getattr\([^)]*,[^)]*,[^)]*\)", text)  # getattr with a default
