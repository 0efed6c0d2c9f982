"""One module per family of models that deltapack patches; each registers itself with
:func:`deltapack.models.layers.register_family` when imported (every module here is imported on first use)."""
