"""The harness's measuring code: hosts, scoring, generation, capture, BLAS choice, model identity.

Why a package of its own: ``tq_core`` is what a user imports (codec, methods, caches,
integrations, ``patch``, CLI, the default-model loader); this is what only the harness needs to
measure it. ``fixtures/`` holds *what* is measured (registries of configs, models, prompts, corpus,
goldens, backends), ``harness/`` *how* (running models through caches on each host), ``suites/``
one metric each, ``reports/`` the pages. Imports run one way: suites -> harness -> tq_core;
``reports`` imports none of them.
"""
