"""The offline long-context benchmark: RULER's tasks built locally (``ruler``) and their scores
(``metrics``)."""
