"""`python -m jobs.finetune_seg --config jobs/configs/seg_<name>.yaml key.sub=value ...` (objective:
segmentation): dense CAST + decoder fine-tuned on dense shards, validation mIoU, ``<run>/best``."""

import sys

from cast.train.cli import run_training_job

if __name__ == "__main__":
    sys.exit(run_training_job(sys.argv[1:], "segmentation"))
