"""Evaluation: a policy against its reference (:mod:`.policy`), metric-human agreement (:mod:`.agreement`),
benchmark answer files (:mod:`.exports`), and eval.json with its printed tables and headline metrics
(:mod:`.results`, light enough for ``alignexp.report`` to import). ``python -m alignexp.evaluate`` is the
command line; docs/evaluation.md defines the metrics."""
