"""The quality report of a run (``bft report RUN_URI``, ``bft run --report``).

``build.py`` follows the data from a run's files to ``report.json`` and ``report.html``;
each group of measures has its own module (``counts``, ``diversity``, ``faithfulness``,
``embeddings``), figures are drawn in ``plots`` and laid out by ``html`` + ``template.html``.
"""
