"""The names of every DP mode a site can be asked to run, below everything that uses them.

``TRAINING_MODES`` are the ways local training is privatized (``fedclip.training.config.Mode``
defines what each means; ``distributed`` is one DP-SGD step over all sites, each site's clipped sum
carrying a share of the noise, summed by secure aggregation: ``fedclip.distributed``); ``INPUT_MODES`` privatize a site's images once, before training
(``fedclip.privatize``). A site's policy (``fedclip.privacy.policy``) allows or refuses them by
these names. Plain names only: importable without torch or the networks behind them.
"""

TRAINING_MODES: tuple[str, ...] = ("microbatch", "unit", "paper", "nonprivate", "distributed")
INPUT_MODES: tuple[str, ...] = ("cadp", "maskdp", "mask-replace")
DP_MODES: tuple[str, ...] = (*TRAINING_MODES, *INPUT_MODES)
