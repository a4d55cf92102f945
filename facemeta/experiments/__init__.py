"""facemeta.experiments: the leave-one-domain-out benchmark of DESIGN.md (presets, runs, summaries).

It sits above training and evaluation: it builds each run's config, prepares its data, trains it
(facemeta.train) and scores it (facemeta.eval); nothing below imports it.
"""
