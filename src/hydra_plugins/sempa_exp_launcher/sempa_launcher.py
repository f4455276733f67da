"""The launcher classes of ``hydra/launcher=submitit_slurm|submitit_local``. Hydra instantiates launchers only from
the ``hydra_plugins`` package, so they are declared here; what they do is in :mod:`sempa_exp.launch.launcher`."""

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

from sempa_exp.launch.launcher import SweepLauncherMixin


class SlurmLauncher(SweepLauncherMixin, BaseSubmititLauncher):
    _EXECUTOR = "slurm"


class LocalLauncher(SweepLauncherMixin, BaseSubmititLauncher):
    _EXECUTOR = "local"
