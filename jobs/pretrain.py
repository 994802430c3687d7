"""`python -m jobs.pretrain --config jobs/configs/<name>.yaml key.sub=value ...` (objective: moco)."""

import sys

from cast.train.cli import run_training_job

if __name__ == "__main__":
    sys.exit(run_training_job(sys.argv[1:], "moco"))
