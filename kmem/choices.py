"""The names the command line offers as choices: datasets, model families, post-hoc
methods. Kept here, free of torch, so that ``kmem --help`` and ``kmem ledger`` start
without loading it; the modules that implement them import their names from here."""

DATASETS = ("digits", "fashion-mnist")  # kmem.datasets.splits
MODELS = ("munkey", "spm", "baseline")  # kmem.models
METHODS = ("FT", "GA", "RL", "SalUn", "SCRUB")  # kmem.unlearn.posthoc
