"""alphanet_ext: fast AlphaNet post-hoc correction of long-tailed classifiers."""
from .ops import (ClassMeanAccumulator, HAS_EXTENSION, alpha_combine, class_means, compiled_with_cuda,
                  knn)

__version__ = "0.1.0"

__all__ = ["ClassMeanAccumulator", "HAS_EXTENSION", "alpha_combine", "class_means", "compiled_with_cuda", "knn",
           "__version__"]
