"""Reply sizes as a site sends them: the benchmark's arithmetic checked on the tiny model."""

from benchmarks.reply_bytes import measure


def test_reply_bytes_are_the_trainable_float32_coordinates_and_lora_is_smaller_than_last_1():
    table = measure("fedclip-tiny", ["all", "last-1", "bias", "lora-4"]).set_index("trainable")
    # float32: 4 bytes per coordinate (the serialised array adds a small header per array)
    for trainable, row in table.iterrows():
        assert (
            4 * row["noised_coordinates"]
            <= row["reply_MB"] * 1e6
            < 4 * row["noised_coordinates"] + 2000 * row["arrays"]
        )
    assert table.loc["all", "reply_share_pct"] == 100
    assert table.loc["bias", "reply_MB"] < table.loc["lora-4", "reply_MB"] < table.loc["last-1", "reply_MB"]
