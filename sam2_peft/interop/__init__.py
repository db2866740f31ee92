"""Interoperability with the official `sam2` package: its configurations and its checkpoint keys.

The public entry points live in `sam2_peft.export`; these modules hold the two maps they rely on:
`official_config` (official YAML -> `Sam2Config`) and `official_keys` (official state dict <-> `Sam2Model`).
"""
