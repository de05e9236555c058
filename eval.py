"""Evaluate checkpoints: ``python eval.py ckpt_path=... [data=...] protocol=f30k``.

The same entry point as the console script ``itm-eval`` (:func:`itm.cli.eval_main`).
"""

from itm.cli import eval_main

if __name__ == "__main__":
    eval_main()
