"""Training / evaluation / sampling entry point, as in score_sde:

    python experiments/main.py --config=configs/toy/two_mode_vp.py --workdir=workdir --mode=train

A thin wrapper around `sdejax.cli` (also installed as the `sdejax` command).
"""
from sdejax.cli import run

if __name__ == "__main__":
    run()
