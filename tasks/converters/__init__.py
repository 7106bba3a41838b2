"""Dataset converters into the image store: one module per source layout, on the shared machinery of ``convert``
(and ``safe_pickle`` for the pickled sources)."""
