"""How to install the optional lmms-eval extra: a leaf module, so the bridge and the jobs can both say it."""

INSTALL_HINT = ('install the lmms-eval extra: pip install -e ".[lmms]" (with a CPU-only torch, beside which '
                "PyPI's torchvision does not work: pip install --no-deps lmms-eval==0.7.3 && pip install -e "
                '".[lmms-core]", the few packages its evaluator imports)')
