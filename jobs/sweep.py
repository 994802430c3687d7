"""`python -m jobs.sweep --config jobs/configs/sweep_moco_lr.yaml key=value ...`: a Ray Tune sweep."""

import sys

from cast.tune.cli import run_sweep_job

if __name__ == "__main__":
    sys.exit(run_sweep_job(sys.argv[1:]))
