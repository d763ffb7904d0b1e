"""The phases of a ``deconvis visualize`` run, each a small module with one job, in run order:

- :mod:`~deconvis.runs.phases.rundir` -- the run folder: files, checkpoints, the run's identity;
- :mod:`~deconvis.runs.phases.prepare` -- load the model and images, build the :class:`Context`;
- :mod:`~deconvis.runs.phases.mine` -- the k strongest images per channel (checkpointed);
- :mod:`~deconvis.runs.phases.project` -- project the winners, write their tiles;
- :mod:`~deconvis.runs.phases.render` -- the grid sheets;
- :mod:`~deconvis.runs.phases.analyses` -- the Section 4 analyses of ``--analyses`` (rank 0);
- :mod:`~deconvis.runs.phases.report` -- ``results.json`` and ``index.html``.

:mod:`deconvis.runs.pipeline` runs them in order; :mod:`deconvis.runs.ranks` holds what the
processes of a ``torchrun`` run exchange between them.
"""
