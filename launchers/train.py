"""Train a policy with FPO (or DPO / SimPO / TDPO baselines) from a reference cache.

    deepspeed --num_gpus 8 launchers/train.py --config train.yaml --deepspeed ds_configs/zero3.json
    torchrun --nproc_per_node 8 launchers/train.py --config train.yaml --deepspeed ds_configs/zero3.json

Thin on purpose: parsing and the recipe live in ``fpo_dist.trainer``.
"""

import sys

from fpo_dist.trainer import main

if __name__ == "__main__":
    sys.exit(main())
