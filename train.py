"""Train an image-text matching model: ``python train.py model/align=chan pooling=lse``.

The same entry point as the console script ``itm-train`` (:func:`itm.cli.train_main`).
"""

from itm.cli import train_main

if __name__ == "__main__":
    train_main()
