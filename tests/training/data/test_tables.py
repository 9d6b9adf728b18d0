"""csv: / parquet: sources with feature tables, times, event weights and one-line errors, and
`recsys data convert` (training/data/tables.py, training/data/convert.py)."""

import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys_cli.main import main as cli
from training.data.convert import write_tables
from training.data.dataset import DataError, Dataset
from training.data.sources import load, read
from training.data.splits import LeaveOneOut
from training.stages.retrieval.item2item import dataset_rows
from training.stages.retrieval.losses import max_fusion_loss
from training.stages.retrieval.train import training_pairs, training_weights

# u1 views a then b, buys c; u2 views b, buys a; u3 views c, a, b. Item d is only in the items table (cold start).
INTERACTIONS = [
    ("u1", "a", 100, 4.0, "view"), ("u2", "b", 101, 3.0, "view"), ("u1", "b", 102, 5.0, "view"),
    ("u1", "c", 103, 2.0, "purchase"), ("u2", "a", 104, 1.0, "purchase"), ("u3", "c", 105, 4.0, "view"),
    ("u3", "a", 106, 4.0, "view"), ("u3", "b", 107, 5.0, "view"),
]
ITEMS = [  # item_id, genres (multi), brand (categorical), price (numeric; d's is missing -> the median)
    ("a", ["Comedy", "Drama"], "acme", 3.5), ("b", ["Drama"], "zeta", 10.0), ("c", [], "acme", 1.0),
    ("d", ["Horror"], "", None),
]
USERS = [("u1", "F", "75001"), ("u2", "M", "10115"), ("u3", "", "75001"), ("u9", "M", "99999")]  # u9: no events


def csv_tables(folder: Path, times: list[Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(u, i, t if times is None else times[k], r, e) for k, (u, i, t, r, e) in enumerate(INTERACTIONS)]
    (folder / "interactions.csv").write_text(
        "user_id,item_id,timestamp,rating,event_type\n" + "".join(f"{u},{i},{t},{r:g},{e}\n" for u, i, t, r, e in rows))
    (folder / "items.csv").write_text("item_id,genres,brand,price\n" + "".join(
        f"{i},{'|'.join(g)},{b},{'' if p is None else p}\n" for i, g, b, p in ITEMS))
    (folder / "users.csv").write_text("user_id,gender,zip\n" + "".join(f"{u},{g},{z}\n" for u, g, z in USERS))
    return folder


def parquet_tables(folder: Path, times: pa.Array | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cols = list(zip(*INTERACTIONS))
    pq.write_table(pa.table({"user_id": list(cols[0]), "item_id": list(cols[1]),
                             "timestamp": times if times is not None else pa.array(cols[2], pa.int64()),
                             "rating": list(cols[3]), "event_type": list(cols[4])}), folder / "interactions.parquet")
    pq.write_table(pa.table({"item_id": [r[0] for r in ITEMS], "genres": pa.array([r[1] for r in ITEMS], pa.list_(pa.string())),
                             "brand": [r[2] or None for r in ITEMS], "price": [r[3] for r in ITEMS]}),
                   folder / "items.parquet")
    pq.write_table(pa.table({"user_id": [r[0] for r in USERS], "gender": [r[1] or None for r in USERS],
                             "zip": [r[2] for r in USERS]}), folder / "users.parquet")
    return folder


def decoded(ds: Dataset, side: str) -> dict[str, list[Any]]:
    """Each feature column as values (codes through their vocabulary)."""
    t = ds.item_features if side == "items" else ds.user_features
    assert t is not None
    out: dict[str, list[Any]] = {}
    for k, c in t.categorical.items():
        out[k] = [t.vocab[k][v - 1] if v else None for v in c.tolist()]
    for k, m in t.multi.items():
        out[k] = [[t.vocab[k][v - 1] for v in row if v] for row in m.tolist()]
    for k, n in t.numeric.items():
        out[k] = n.tolist()
    return out


def assert_same(a: Dataset, b: Dataset) -> None:
    for name in ("user_ids", "item_ids", "users", "items", "timestamps", "ratings", "weights"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for side in ("item_features", "user_features"):
        ta, tb = getattr(a, side), getattr(b, side)
        assert (ta is None) == (tb is None), side
        if ta is None:
            continue
        assert ta.vocab == tb.vocab, side
        for kind in ("categorical", "multi", "numeric"):
            assert getattr(ta, kind).keys() == getattr(tb, kind).keys(), (side, kind)
            for k in getattr(ta, kind):
                np.testing.assert_array_equal(getattr(ta, kind)[k], getattr(tb, kind)[k], err_msg=f"{side}.{k}")
    assert a.fingerprint == b.fingerprint


def test_csv_features_kinds_and_cold_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    ds = load(f"csv:{csv_tables(tmp_path)},cat=zip")
    assert ds.item_ids.tolist() == ["<pad>", "a", "b", "c", "d"]  # d: catalog only, appended after the logged items
    assert ds.num_interactions == 8 and ds.user_ids.tolist() == ["u1", "u2", "u3"]  # u9 has no events: dropped
    items = decoded(ds, "items")
    assert items["genres"] == [[], ["Comedy", "Drama"], ["Drama"], [], ["Horror"]]  # row 0 = padding
    assert items["brand"] == [None, "acme", "zeta", "acme", None]
    assert items["price"] == [0.0, 3.5, 10.0, 1.0, 3.5]  # d's missing price: the median of 3.5, 10, 1
    users = decoded(ds, "users")
    assert users == {"gender": ["F", "M", None], "zip": ["75001", "10115", "75001"]}  # zip declared categorical
    # what was inferred is printed, kind by kind
    assert "genres (multi-valued, 3 values), brand (categorical, 2 values), price (numeric, 1 missing -> median 3.5)" \
        in caplog.text
    # undeclared, the all-digit zip column is read as a number
    assert set(load(f"csv:{tmp_path}").user_features.numeric) == {"zip"}  # type: ignore[union-attr]
    skipped = load(f"csv:{tmp_path},skip=brand+zip")
    assert set(skipped.item_features.names()) == {"genres", "price"}  # type: ignore[union-attr]


def test_parquet_reads_the_same_data_set_as_csv(tmp_path: Path) -> None:
    assert_same(load(f"csv:{csv_tables(tmp_path / 'c')},cat=zip,weight.purchase=5"),
                load(f"parquet:{parquet_tables(tmp_path / 'p')},cat=zip,weight.purchase=5"))


def test_files_named_one_by_one_and_other_column_names(tmp_path: Path) -> None:
    csv_tables(tmp_path)
    text = (tmp_path / "interactions.csv").read_text().replace("user_id,item_id,timestamp", "customer,sku,ts", 1)
    (tmp_path / "log.csv").write_text(text)
    (tmp_path / "catalog.csv").write_text((tmp_path / "items.csv").read_text().replace("item_id", "sku", 1))
    ds = load(f"csv:{tmp_path / 'log.csv'},user=customer,item=sku,time=ts,items={tmp_path / 'catalog.csv'}")
    assert_same(ds, load(f"csv:{tmp_path / 'interactions.csv'},items={tmp_path / 'items.csv'}"))
    assert ds.user_features is None


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_convert_writes_tables_that_read_back_the_same(tmp_path: Path, fmt: str) -> None:
    spec = f"csv:{csv_tables(tmp_path / 'src')},cat=zip,weight.purchase=5"
    files, back = write_tables(read(spec), tmp_path / "out", fmt)  # type: ignore[arg-type]
    assert [f.name for f in files] == [f"{n}.{fmt}" for n in ("interactions", "items", "users")]
    # a CSV needs zip declared (its values look like numbers); both keep the event weights
    assert back == f"{fmt}:{tmp_path / 'out'},weight.purchase=5" + (",cat=zip" if fmt == "csv" else "")
    assert_same(load(spec), load(back))


def test_recsys_data_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = csv_tables(tmp_path / "src")
    assert cli(["data", "convert", "--data", f"csv:{src},cat=zip", "--out", str(tmp_path / "out"),
                "--format", "csv", "parquet"]) == 0
    out = capsys.readouterr().out
    assert f"read back with --data csv:{tmp_path / 'out'},cat=zip: the same data set" in out
    assert f"read back with --data parquet:{tmp_path / 'out'}: the same data set" in out


def test_iso_and_unix_times_give_the_same_seconds(tmp_path: Path) -> None:
    unix = load(f"csv:{csv_tables(tmp_path / 'unix')}")
    iso = [  # the same instants: UTC with Z, with an offset, naive (= UTC), with a space, fractional seconds
        "1970-01-01T00:01:40Z", "1970-01-01T02:01:41+02:00", "1970-01-01T00:01:42", "1970-01-01 00:01:43",
        "1970-01-01T00:01:44.900Z", "1970-01-01T00:01:45+00:00", "1970-01-01T00:01:46Z", "1970-01-01T00:01:47Z",
    ]
    assert_same(unix, load(f"csv:{csv_tables(tmp_path / 'iso', times=iso)}"))
    floats = [f"{r[2]}.0" for r in INTERACTIONS]
    assert_same(unix, load(f"csv:{csv_tables(tmp_path / 'float', times=floats)}"))
    stamps = pa.array([t * 1000 + 999 for t in (r[2] for r in INTERACTIONS)], pa.timestamp("ms", tz="UTC"))
    strings = pa.array(iso, pa.string())
    for name, times in (("stamps", stamps), ("strings", strings)):
        assert_same(load(f"parquet:{parquet_tables(tmp_path / name, times)}"),
                    load(f"parquet:{parquet_tables(tmp_path / 'pq-unix')}"))


def test_event_weights_reach_the_training_data(tmp_path: Path) -> None:
    ds = load(f"csv:{csv_tables(tmp_path)},weight.purchase=5")
    # the log sorted by user then time: u1 a b c(purchase), u2 b a(purchase), u3 c a b
    assert ds.weights is not None and ds.weights.tolist() == [1, 1, 5, 1, 5, 1, 1, 1]
    assert load(f"csv:{tmp_path}").weights is None  # no weight.<type>: every event counts 1
    # the item-to-item route's rows carry them
    rows = dataset_rows(ds, np.ones(ds.num_interactions, bool))
    assert rows.weights is not None and rows.weights.tolist() == ds.weights.tolist()
    # the retrieval loss's: one user, views a b, buys c, views d e f; leave-one-out trains on a b c d
    log = tmp_path / "one"
    log.mkdir()
    (log / "interactions.csv").write_text("user_id,item_id,timestamp,event_type\n" + "".join(
        f"u,{i},{t},{'purchase' if i == 'c' else 'view'}\n" for t, i in enumerate("abcdef")))
    split = LeaveOneOut(load(f"csv:{log},weight.purchase=5"))
    inputs, targets = training_pairs(split, maxlen=3)
    w = training_weights(split, maxlen=3)
    assert targets.tolist() == [[2, 3, 4]]  # b c d after a b c
    # target weights 1, 5, 1, normalised to mean 1 over the targets
    assert w is not None and w[0].tolist() == pytest.approx([3 / 7, 15 / 7, 3 / 7])
    assert training_weights(LeaveOneOut(load(f"csv:{log}")), maxlen=3) is None


def test_weighted_loss_is_the_weighted_mean() -> None:
    torch.manual_seed(0)
    user, items, target = torch.randn(4, 1, 8), torch.randn(6, 8), torch.tensor([1, 2, 3, 4])
    weight = torch.tensor([1.0, 1.0, 5.0, 1.0])
    per = torch.stack([max_fusion_loss(user[p : p + 1], items, target[p : p + 1])[0] for p in range(4)])
    loss, _ = max_fusion_loss(user, items, target, weight=weight)
    assert loss.item() == pytest.approx((per * weight).mean().item(), rel=1e-5)
    assert max_fusion_loss(user, items, target)[0].item() == pytest.approx(per.mean().item(), rel=1e-5)


def _bad(tmp_path: Path, name: str, text: str) -> Path:
    csv_tables(tmp_path)
    (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("name, text, spec, message", [
    ("interactions.csv", "user_id,item_id,timestamp\nu1,a,1\nu1,b,yesterday\n", "",
     "interactions.csv:3: column 'timestamp': expected Unix seconds or an ISO-8601 time (2024-01-31T12:00:00Z), "
     "got 'yesterday'"),
    ("interactions.csv", "user_id,item_id,timestamp\nu1,a,1\n,b,2\n", "", "interactions.csv:3: column 'user_id': empty user id"),
    ("interactions.csv", "user_id,item_id,timestamp,rating\nu1,a,1,5\nu1,b,2,good\n", "",
     "interactions.csv:3: column 'rating': expected a finite number, got 'good'"),
    ("interactions.csv", "user_id,item_id,timestamp,event_type\nu1,a,1,view\nu1,b,2,\n", "",
     "interactions.csv:3: column 'event_type': empty event type"),
    ("interactions.csv", "user_id,item_id,timestamp\nu1,a,1\nu1,b,2,x\n", "", "interactions.csv:3: 4 fields where the header has 3"),
    ("interactions.csv", "user_id,item_id,time\nu1,a,1\n", "",
     "interactions.csv: no column 'timestamp' (time; columns: user_id, item_id, time)"),
    ("items.csv", "item_id,year\na,1999\nb,soon\n", "num=year", "items.csv:3: column 'year': expected a finite number, got 'soon'"),
    ("items.csv", "item_id,year\na,1999\na,2001\n", "", "items.csv:3: column 'item_id': 'a' appears again (first on line 2)"),
    ("items.csv", "item_id,year\na,1999\n,2001\n", "", "items.csv:3: column 'item_id': empty item_id"),
    ("users.csv", "gender,user_id\nF,u1\n", "weight.buy=2", "weight.buy: no row has event type 'buy' (types: purchase, view)"),
    ("users.csv", "gender,user_id\nF,u1\n", "num=age", "csv: declared column 'age' is in no feature table"),
    ("users.csv", "gender,user_id\nF,u1\n", "weight.view=-1", "csv: weight.view must be a number > 0, got '-1'"),
    ("users.csv", "gender,user_id\nF,u1\n", "colour=red", "csv: unknown option 'colour' (keys: items, users, user"),
    ("users.csv", "gender\nF\n", "", "users.csv: no header row naming 'user_id'"),
    ("users.csv", "user_id,history\nu1,x\n", "", "users.csv: column 'history' has the name of a feature the pipeline "
                                                  "adds itself; rename it, or leave it out with skip=history"),
])
def test_bad_rows_are_one_line_errors_naming_file_row_and_column(tmp_path: Path, name: str, text: str, spec: str,
                                                                  message: str) -> None:
    folder = _bad(tmp_path, name, text)
    with pytest.raises(DataError, match=re.escape(message)) as info:
        load(f"csv:{folder}" + (f",{spec}" if spec else ""))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("column, values, message", [
    ("timestamp", ["1", "2", "later", *["3"] * 5], "interactions.parquet: row 3, column 'timestamp': expected Unix "
                                                 "seconds or an ISO-8601 time (2024-01-31T12:00:00Z), got 'later'"),
    ("user_id", ["u1", None, *["u2"] * 6], "interactions.parquet: row 2, column 'user_id': empty user id"),
    ("rating", [1.0, 2.0, float("nan"), *[1.0] * 5], "interactions.parquet: row 3, column 'rating': expected a finite "
                                                     "number, got nan"),
])
def test_bad_parquet_rows_name_file_row_and_column(tmp_path: Path, column: str, values: list[Any], message: str) -> None:
    parquet_tables(tmp_path)
    table = pq.read_table(tmp_path / "interactions.parquet")
    table = table.set_column(table.column_names.index(column), column, pa.array(values))
    pq.write_table(table, tmp_path / "interactions.parquet")
    with pytest.raises(DataError, match=re.escape(message)):
        load(f"parquet:{tmp_path}")


def test_a_file_that_is_not_parquet(tmp_path: Path) -> None:
    parquet_tables(tmp_path)
    (tmp_path / "items.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="items.parquet: not a readable Parquet file"):
        load(f"parquet:{tmp_path}")


def test_weights_change_what_the_retriever_learns(tmp_path: Path) -> None:
    from models.sasrec import SASRecConfig
    from training.stages.retrieval.train import RetrievalTrainConfig, train_retrieval

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = "".join(f"u{u},i{rng.integers(20)},{t},{'purchase' if t % 3 == 0 else 'view'}\n"
                   for u in range(30) for t in range(8))
    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp,event_type\n" + rows)

    def trained(spec: str) -> torch.Tensor:
        split = LeaveOneOut(load(spec))
        cfg = SASRecConfig(num_items=split.num_items, maxlen=8, dim=8, num_blocks=1, num_heads=1)
        res = train_retrieval(split, cfg, RetrievalTrainConfig(epochs=1, batch_size=8, seed=0), progress=False)
        return res.model.item_embedding.weight.detach()

    plain = trained(f"csv:{tmp_path}")
    assert torch.equal(plain, trained(f"csv:{tmp_path},weight.view=1"))  # all weights 1: the unweighted run
    assert not torch.allclose(plain, trained(f"csv:{tmp_path},weight.purchase=5"))


def test_ml100k_tables_are_the_movielens_data_set(ml100k_path: Path, tmp_path: Path) -> None:
    raw = read(f"movielens:{ml100k_path}")
    source = raw.build()
    for fmt in ("csv", "parquet"):
        _, spec = write_tables(raw, tmp_path, fmt)  # type: ignore[arg-type]
        assert spec == f"{fmt}:{tmp_path}"  # nothing to declare: every kind is inferred right
        assert_same(source, load(spec))
