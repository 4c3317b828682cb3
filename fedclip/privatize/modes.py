"""The names of the input-level privatizations, importable without the networks behind them."""

INPUT_MODES: tuple[str, ...] = ("cadp", "maskdp", "mask-replace")
