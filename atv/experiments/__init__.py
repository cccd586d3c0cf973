"""The experiments layer: jobs and studies built from the leaf libraries (``pruning``, ``mot_probe``,
``evaluation``, ``analysis``), which never import from here.

- :mod:`.prune_job` -- ``atv prune``: load, calibrate, prune, save;
- :mod:`.probe_study` -- ``atv probe``: the MoT pathway x pool x sparsity grid;
- :mod:`.compare` -- the method x setting grid on the shared weights;
- :mod:`.eval_job` -- ``atv eval``: score a folder or a re-created probe cell;
- :mod:`.demo` -- ``atv demo``: everything above on the embedded default model;
- :mod:`.records` and :mod:`.cells` -- the result log and the cell runner every grid shares.
"""
