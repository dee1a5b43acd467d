"""`prepare_dataset` and `mml data prepare`: caching, atomic replacement, option checks, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_data_movielens import T, ratings_for, write_ml1m
from typer.testing import CliRunner

import training.data.prepare as prepare_module
from mml.cli import app, main
from mml.errors import DataError
from training.data.generic import DataWarning
from training.data.prepare import prepare_dataset

pytestmark = pytest.mark.filterwarnings("ignore::training.data.generic.DataWarning")  # non-official fixtures


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_ml1m(tmp_path / "src", ratings_for())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_writes_the_contract_files(tmp_path: Path, source: Path) -> None:
    stats = prepare_dataset(tmp_path / "out", source=source, T=T, verbose=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "items.parquet",
        "meta.json",
        "new_users.parquet",
        "old_interactions.parquet",
        "stats.json",
    ]
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["source"] == {
        "kind": "source",
        "layout": "ml-1m",
        "path": str(source.resolve()),
        "official": False,
    }
    assert set(meta["files_sha256"]) == {"ratings.dat", "movies.dat", "users.dat"}
    assert meta["options"] == {"T": T, "support": 8, "cold_items": 0.0, "seed": 2020}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_cached_when_inputs_and_options_are_unchanged(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    first = prepare_dataset(out, source=source, T=T, verbose=False)
    before = snapshot(out)

    def fail(*args, **kwargs):
        raise AssertionError("the split was recomputed")

    monkeypatch.setattr(prepare_module, "make_split", fail)
    assert prepare_dataset(out, source=source, T=str(T), verbose=False) == first  # same T, other spelling
    assert snapshot(out) == before
    monkeypatch.undo()

    changed = prepare_dataset(out, source=source, T=T, cold_items=0.5, verbose=False)  # new options
    assert changed["n_cold_items"] > 0 and json.loads((out / "stats.json").read_text()) == changed
    with (source / "ml-1m" / "ratings.dat").open("a") as handle:  # new input content
        handle.write(f"1::4::3::{T - 1}\n")
    assert prepare_dataset(out, source=source, T=T, verbose=False)["n_old_interactions"] == (
        first["n_old_interactions"] + 1
    )


def test_an_interrupted_run_leaves_no_half_written_folder(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(folder: Path, meta: dict) -> None:
        (folder / "meta.json").write_text("{")  # half written, then the process dies
        raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(prepare_module, "write_meta", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(out, source=source, T=T, verbose=False)
    assert list(tmp_path.iterdir()) == [source]  # no out, no staging folder
    monkeypatch.undo()

    prepare_dataset(out, source=source, T=T, verbose=False)
    before = snapshot(out)
    monkeypatch.setattr(prepare_module, "write_meta", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(out, source=source, T=T, cold_items=0.5, verbose=False)
    assert snapshot(out) == before  # the previous split is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_never_replaces_a_folder_that_is_not_a_split(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a prepared split: refusing to replace it"):
        prepare_dataset(out, source=source, T=T, verbose=False)
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cold_items": 1.0}, "cold_items: Input should be less than 1"),
        ({"cold_items": -0.1}, "cold_items: Input should be greater than or equal to 0"),
        ({"support": 0}, "support: Input should be greater than or equal to 1"),
        ({"T": "tomorrow"}, "T: 'tomorrow' is neither unix seconds nor an ISO-8601 time"),
    ],
)
def test_bad_options_name_the_field(tmp_path: Path, source: Path, options: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        prepare_dataset(tmp_path / "out", source=source, **{"T": T, **options})


def test_source_and_mirror_together_is_an_error(tmp_path: Path, source: Path) -> None:
    with pytest.raises(DataError, match="either a source folder or a mirror"):
        prepare_dataset(tmp_path / "out", source=source, mirror=source, T=T)


def test_cli_prepare(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "data",
            "prepare",
            "--out",
            str(out),
            "--source",
            str(source),
            "--T",
            "1970-01-12T13:46:40Z",
            "--support",
            "6",
        ],
    )
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["T"], stats["support"], stats["n_new_users"]) == (T, 6, 2)
    assert "#inter/user" in result.output


def test_cli_error_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(
        sys, "argv", ["mml", "data", "prepare", "--out", str(tmp_path / "o"), "--source", str(tmp_path)]
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.strip().count("\n") == 0 and error.startswith("error: source ")


def test_warnings_are_data_warnings(tmp_path: Path, source: Path) -> None:
    with open(source / "ml-1m" / "ratings.dat", "a") as handle:
        handle.write(f"500::1::3::{T + 5}\n")  # a new user with a single interaction
    with pytest.warns(DataWarning, match="1 new user"):
        stats = prepare_dataset(tmp_path / "out", source=source, T=T, verbose=False)
    assert stats["n_new_users_dropped"] == 1
