"""crd-inspect: Crossmodal Reverse Distillation for paired RGB + 3D inspection.

Importing this package (and `crd_model.data`) never imports torch: camera PCs that run the
producers install the base distribution only. Model code lives in modules that import torch
themselves (`crd_model.torch_model`, `crd_model.inspector`, ...).
"""

__version__ = "0.1.0"
