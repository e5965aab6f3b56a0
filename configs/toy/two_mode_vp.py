"""The quick-start run: MLP on 0.2·N((−5,−5), I) + 0.8·N((5,5), I), VP SDE, ε-prediction."""
from configs.default_toy import get_config  # noqa: F401  (the default is this experiment)
