"""A run's tables: every column of the schema is written, and a resumed older table is upgraded."""

import pandas as pd

from fedclip.reporting.run_files import TABLES, RunFiles


def test_rows_keep_what_each_epsilon_is_about(tmp_path):
    files = RunFiles(tmp_path)
    row = {c: 1 for c in TABLES["rounds"]} | {"neighbours": "add or remove one patient", "covers": "pairs"}
    files.append("rounds", [row])
    assert files.read("rounds")[["neighbours", "covers"]].iloc[0].tolist() == ["add or remove one patient", "pairs"]


def test_an_older_table_gains_the_new_columns_before_rows_are_appended(tmp_path):
    old = [c for c in TABLES["rounds"] if c not in ("neighbours", "covers")]
    pd.DataFrame([{c: 1 for c in old}]).to_csv(tmp_path / "rounds.csv", index=False)
    files = RunFiles(tmp_path)
    files.append("rounds", [{c: 2 for c in TABLES["rounds"]}])
    table = pd.read_csv(tmp_path / "rounds.csv", keep_default_na=False)
    assert list(table.columns) == list(TABLES["rounds"])
    assert table["round"].tolist() == [1, 2] and table["neighbours"].tolist() == ["", "2"]
