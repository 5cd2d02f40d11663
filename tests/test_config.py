import pytest

from scalelm.config import ConfigError, load_toml, resolve


def test_overrides_map_onto_fields():
    cfg = resolve(overrides=["--optim.lr=1e-3", "--train.max_steps=2000", "--train.micro_batch_size=12",
                             "--train.seed=1337", "--model.block_size=64", "--model.dropout=0.0",
                             "--train.precision", "bf16", "--train.compile=True"])
    assert cfg.optim.lr == 1e-3 and cfg.train.max_steps == 2000 and cfg.train.micro_batch_size == 12
    assert cfg.train.seed == 1337 and cfg.model.block_size == 64 and cfg.model.dropout == 0.0
    assert cfg.train.precision == "bf16" and cfg.train.compile is True


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match="optim.lrr.*did you mean 'optim.lr'"):
        resolve(overrides=["--optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        resolve(overrides=["--train.max_step=5"])


def test_bad_type_and_bad_choice():
    with pytest.raises(ConfigError):
        resolve(overrides=["--optim.lr=abc"])
    with pytest.raises(ConfigError):
        resolve(overrides=["--train.precision=fp8"])


def test_heads_must_divide_width():
    with pytest.raises(ConfigError, match="n_head=5 does not divide n_embd=128"):
        resolve(overrides=["--model.n_embd=128", "--model.n_head=5"])
    with pytest.raises(ConfigError, match="n_kv_head=3 must divide n_head=4"):
        resolve(overrides=["--model.n_embd=128", "--model.n_head=4", "--model.n_kv_head=3"])


def test_toml_preset_then_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('preset = "baby"\n[optim]\nlr = 2e-3\n[train]\nmax_steps = 7\n')
    cfg = resolve(config_file=str(f), overrides=["--train.max_steps=9"])
    assert cfg.model.n_layer == 4 and cfg.model.n_embd == 128 and cfg.model.block_size == 64
    assert cfg.optim.lr == 2e-3 and cfg.train.max_steps == 9 and cfg.optim.beta2 == 0.99


def test_toml_errors(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[optim]\nlearning_rate = 1e-3\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        load_toml(f)
    f.write_text("[optimizer]\nlr = 1e-3\n")
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        load_toml(f)
    f.write_text("[train]\nmax_steps = 'ten'\n")
    with pytest.raises(ConfigError, match="expected an integer"):
        load_toml(f)
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="unknown preset 'bbay'; did you mean 'baby'"):
        resolve(preset="bbay")


def test_config_roundtrip_json(tmp_path):
    from scalelm.config import load_config_json, save_config

    cfg = resolve(preset="llama-60m", overrides=["--optim.lr=3e-4"])
    save_config(cfg, tmp_path / "config.json")
    assert load_config_json(tmp_path / "config.json") == cfg


def test_every_preset_resolves_and_the_3_minute_one_trains_by_time():
    from scalelm.presets import PRESETS

    for name in PRESETS:
        resolve(preset=name)  # validated
    cfg = resolve(preset="shakespeare-3min")
    assert cfg.train.max_minutes is not None and cfg.train.max_minutes < 3  # start-up and the last eval fit in 3 min
    assert cfg.train.max_steps >= 100_000 and cfg.optim.schedule == "cosine"  # the time decides, and the schedule
