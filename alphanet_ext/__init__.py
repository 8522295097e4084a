"""alphanet_ext: fast AlphaNet post-hoc correction of long-tailed classifiers."""
__version__ = "0.1.0"

from .ops import (ClassMeanAccumulator, HAS_EXTENSION, alpha_combine, class_means, compiled_with_cuda,  # noqa: E402
                  knn)
from .metrics import evaluate, make_splits  # noqa: E402
from .config import FitConfig  # noqa: E402
from .fit import FitResult, combine_experts, fit, fit_with_config, load  # noqa: E402
from . import baselines, synthetic  # noqa: E402

__all__ = ["ClassMeanAccumulator", "baselines", "FitConfig", "FitResult", "fit_with_config", "HAS_EXTENSION", "alpha_combine", "class_means", "combine_experts",
           "compiled_with_cuda", "evaluate", "fit", "knn", "load", "make_splits", "synthetic", "__version__"]
