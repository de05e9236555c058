"""itm's Hydra configs. Installed as the package ``itm.conf`` (Hydra search path ``pkg://itm.conf``)."""
