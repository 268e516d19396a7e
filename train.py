"""Train a window expert or a first-stage autoencoder: `python train.py experiment=<name> [overrides]`
(the same as `refiner train ...`; body in refiner/apps/train.py).

Exit codes (refiner.cli): 0 trained; 2 a setting, checkpoint or data path that cannot work (one `error:`
line on stderr, before any compute where possible).
"""

from refiner.apps.train import main

if __name__ == "__main__":
    main()
