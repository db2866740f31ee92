import pytest
import yaml

from sam2_peft.config import DEFAULT_LEARNING_RATES, TrainConfig, parse_config


def write_yaml(tmp_path, values) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_yaml_then_command_line_overrides(tmp_path):
    path = write_yaml(tmp_path, {"model": "tiny-random", "strategy": "partial", "num_blocks": 2, "max_steps": 3})
    cfg = parse_config(["--config", path, "--max_steps", "5", "--augment", "false", "--blocks", "0,1"])
    assert (cfg.model, cfg.strategy, cfg.num_blocks, cfg.max_steps, cfg.augment) == ("tiny-random", "partial", 2, 5, False)
    assert cfg.learning_rate == DEFAULT_LEARNING_RATES["partial"]
    assert cfg.strategy_options() == {"num_blocks": 2, "train_neck": False, "train_prompt_encoder": False}


def test_effective_config_round_trips(tmp_path):
    cfg = TrainConfig(model="tiny-random", strategy="dora", lora_r=4, blocks="last:2", ct_window="40,400")
    cfg.save(tmp_path / "config.yaml")
    again = parse_config(["--config", str(tmp_path / "config.yaml")])
    assert again == cfg
    assert cfg.strategy_options()["blocks"] == "last:2"
    assert cfg.intensity_config().window == (40.0, 400.0)


def test_per_strategy_learning_rates():
    assert TrainConfig(strategy="decoder").learning_rate == 1e-4
    assert TrainConfig(strategy="full").learning_rate == 1e-5
    assert TrainConfig(strategy="loha").learning_rate == 1e-4
    assert TrainConfig(strategy="full", learning_rate=3e-4).learning_rate == 3e-4


def test_unknown_keys_flags_and_values_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lerning_rate'\]"):
        parse_config(["--config", write_yaml(tmp_path, {"lerning_rate": 1e-3})])
    with pytest.raises(ValueError, match="--bogus"):
        parse_config(["--bogus", "1"])
    with pytest.raises(FileNotFoundError, match="--config missing.yaml"):
        parse_config(["--config", "missing.yaml"])
    with pytest.raises(ValueError, match="`--strategy partial` needs `--num_blocks N`"):
        TrainConfig(strategy="partial")
    with pytest.raises(ValueError, match="`--mixed_precision fp8` is unknown"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="`--strategy lora2` is unknown"):
        TrainConfig(strategy="lora2")
    with pytest.raises(ValueError, match="`--blocks 1-3` is not understood"):
        TrainConfig(blocks="1-3").block_selection()


def test_options_of_other_strategies_are_reported():
    assert TrainConfig(strategy="lora", num_blocks=2, lora_r=4).ignored_options() == ["--num_blocks 2"]
    assert TrainConfig(strategy="decoder", lora_r=16, train_prompt_encoder=True).ignored_options() == ["--lora_r 16"]
    assert TrainConfig(strategy="partial", num_blocks=2, train_neck=True).ignored_options() == []
