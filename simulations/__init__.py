"""Simulations, by room: the runner and its scenarios here (``runner``, ``scenarios``, ``partitions``,
``sources``, ``corpus``, ``progress``, ``plan``, the apps ``serverapp`` / ``clientapp``), the cohort
engine in ``engine/``, every benchmark in ``bench/``, the utility and late-joiner studies in
``studies/``, the empirical audit in ``audit/`` and the local deployment rehearsal in ``deploy/``.
The rooms import the runner's modules and the layers below, never each other
(``tests/test_layers.py``)."""
