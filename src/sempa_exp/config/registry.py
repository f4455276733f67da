"""Everything the entry points register in Hydra's ConfigStore before composing, in one call."""

from __future__ import annotations


def register_all() -> None:
    """The typed schemas (config.schema), the run-naming settings (records.identity) and the sweep launchers."""
    from sempa_exp.config.schema import register_configs
    from sempa_exp.launch.launcher import register_launcher_configs
    from sempa_exp.records.identity import register_identity_config

    register_configs()
    register_identity_config()
    register_launcher_configs()
