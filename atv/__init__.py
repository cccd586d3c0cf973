"""atv-toolkit: the MoT sensitivity probe, ATV-Pruning and its baselines for vision-language models.

The libraries are ``pruning`` (engine, adapters, math), ``mot_probe`` (modality routing), ``evaluation``
(harness, lmms-eval bridge) and ``analysis`` (figures, tables); ``atv.experiments`` builds the jobs and
studies on them and ``atv.cli`` is the ``atv`` command.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("atv-toolkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
