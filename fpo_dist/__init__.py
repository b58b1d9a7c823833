"""fpo-dist: FPO preference optimisation with an offline, Ray-built reference cache and DeepSpeed ZeRO-3.

Importing the package is cheap: heavy dependencies (torch, transformers, sae_lens, ray, deepspeed,
zarr) are imported only by the modules that use them.
"""

__version__ = "0.1.0"
