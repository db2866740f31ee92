"""One data configuration for every command: the same fields, parsed the same way, unknown keys refused."""

import dataclasses

import pytest

from sam2_peft.config import TrainConfig, parse_config
from sam2_peft.data.config import DataConfig, build_data_parser, parse_data_args
from sam2_peft.errors import ConfigError


def test_train_config_is_a_data_config_with_the_defaults_resolved():
    names = {f.name for f in dataclasses.fields(DataConfig)}
    assert names <= {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(model="tiny-random")
    assert (cfg.intensity, cfg.intensity_percentiles, cfg.mask_type) == ("auto", "0.5,99.5", "instance")
    assert cfg.data_config() == DataConfig(intensity="auto", intensity_percentiles="0.5,99.5", mask_type="instance")


def test_command_parsers_read_yaml_then_flags_and_refuse_unknown_keys(tmp_path):
    parser = build_data_parser("sam2-peft eval", "test")
    parser.add_argument("--model", required=True)
    config = tmp_path / "data.yaml"
    config.write_text("data: scans\nct_window: lung\nmin_object_area: 4\n")
    data, extra = parse_data_args(parser, ["--config", str(config), "--min_object_area", "9", "--model", "tiny-random"])
    assert (data.data, data.ct_window, data.min_object_area, extra.model) == ("scans", "lung", 9, "tiny-random")
    assert data.intensity is None, "an unset preprocessing field stays unset, for the adapter to fill"
    config.write_text("data: scans\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\].*`sam2-peft eval --help`"):
        parse_data_args(parser, ["--config", str(config), "--model", "m"])
    with pytest.raises(ConfigError, match=r"Unknown flag\(s\) \['--intensty', 'minmax'\]; `sam2-peft eval --help`"):
        parse_data_args(parser, ["--model", "m", "--intensty", "minmax"])


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"mask_type": "blobs"}, r"`--mask_type blobs` is unknown"),
        ({"intensity_percentiles": "99,1"}, r"`--intensity_percentiles 99,1` must satisfy"),
        ({"intensity_percentiles": "low"}, r"use 'low,high'"),
        ({"ct_window": "40"}, r"window='40' is not a preset"),
        ({"ct_window": "40,wide"}, r"`--ct_window 40,wide`: use a preset or 'level,width'"),
        ({"val_fraction": 1.5}, r"`--val_fraction` must be in \[0, 1\)"),
    ],
)
def test_bad_values_name_the_flag(fields, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**fields)


def test_percentiles_reach_the_intensity_config():
    assert DataConfig(intensity="percentile", intensity_percentiles="2,98").intensity_config().percentiles == (2, 98)
    assert parse_config(["--intensity_percentiles", "1,99"]).intensity_config().percentiles == (1, 99)
