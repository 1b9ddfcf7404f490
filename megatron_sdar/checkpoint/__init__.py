"""Checkpoints and run directories, in one place.

* :mod:`.training`: training checkpoints (model, optimizer, per-rank RNG states, the trainer's
  state): ``save_checkpoint`` / ``load_checkpoint`` / ``load_latest_checkpoint`` (collective),
  atomic saves, reshard on load, what may change between save and load.
* :mod:`.resume`: what a run resumes from and what a run directory may receive (cheap, not
  collective): ``find_latest_checkpoint``, ``read_complete_checkpoint``, ``check_run_directory``
  (a new run never overwrites one), ``discard_run`` (a restart from scratch moves the old run aside).
* :mod:`.model`: model-only checkpoints (``tools/convert_checkpoint.py``'s format, loadable at any
  layout) and what both kinds share: format names, ``megatron_sdar_model.json``, HF assets,
  ``verify_checkpoint``.
* :mod:`.integrity`: the completion marker ``complete.json`` and the xxh3-64 checksums of every file.
* :mod:`.rng`: a process's random generator states, captured and restored whole.

Workarounds for megatron-core's optimizer-state code that the training checkpoints rely on live
with the project's other workarounds in :mod:`megatron_sdar.patches`. Nothing here imports the
trainer or the config: ``config/schema.py`` validates ``trainer.resume`` and
``trainer.output_dir`` with :mod:`.resume`. Submodules are imported on use.
"""
