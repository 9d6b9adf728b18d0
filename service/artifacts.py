"""Load and validate one published artifact version (DESIGN.md §5) for serving. No torch.

artifacts/CURRENT names the live version; artifacts/<version>/manifest.json says what every
file is (read and validated once by service/contract/manifest.py). Nothing here parses a file
name: paths come from the manifest's `files`, and each must be a plain file name inside the
version folder (no path separators, no dot files, no symlink out of it). Every problem of any kind (a bad value, a truncated zip, undecodable bytes, ...) is
an :class:`ArtifactError` naming the folder, the file and what is wrong.

Arrays are memory-mapped by default (`mmap=True`): items.npy, the pre-rank item heads, the
re-rank item features and the catalog's arrays are opened read-only from the page cache and the
FAISS index is read with IO_FLAG_MMAP_IFC, so loading a 1M-item version reads headers instead of
~0.6 GB (and retrieval.onnx keeps its weights, the item table, in retrieval.onnx.data, which ONNX
Runtime maps: files.retrieval_onnx_data), two versions of a worker (or two workers) share the pages of the same files, and a page
is read from disk only when a request touches it. A published version's files never change in
place (a new version is a new folder), which is what mapping them needs.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort

from service.contract.catalog import CatalogArrays, CatalogError, ItemFeatures
from service.contract.layout import CURRENT, MANIFEST, ContractError, read_current
from service.contract.manifest import Manifest, needed_files, read_json
from service.ids import ItemIndex
from service.index import load_index, nonfinite_vector, search_fused
from service.contract.pair_features import PAIR_ITEMS_COLUMNS
from service.item2item import Item2ItemRoute
from service.pair_features import PairTables, category_codes
from service.npz_map import map_npz
from service.prerank import score_candidates
from service.strict_json import first_nonfinite, first_nonfinite_row

logger = logging.getLogger(__name__)

_ORT = ort.capi.onnxruntime_pybind11_state
# what ONNX Runtime raises for an unreadable model or a bad feed (none derives from RuntimeError)
ORT_ERRORS: tuple[type[Exception], ...] = (_ORT.Fail, _ORT.InvalidProtobuf, _ORT.NoSuchFile, _ORT.InvalidArgument,
                                           _ORT.InvalidGraph, _ORT.RuntimeException, _ORT.NotImplemented)
_SMOKE_ERRORS: tuple[type[Exception], ...] = (*ORT_ERRORS, ValueError, IndexError)


class ArtifactError(Exception):
    """A version folder that cannot be served; the message names the file and the problem."""


@dataclass(eq=False)
class LoadedVersion:
    """Everything the online pipeline needs from one version, loaded and checked.

    item_ids: (N + 1,) external ids, [0] = padding; id_to_index maps them back (padding left out).
    popularity: (N + 1,) int64 training-part counts. item_features: the catalog's feature
    columns and vocabularies by name (service.contract.catalog). items: (N, D) float32, row r = item r + 1.
    prerank_items: (N + 1, G, d). rerank_items: (N + 1, F) or None without a re-ranker.
    """

    version: str
    path: Path
    manifest: Manifest
    item_ids: np.ndarray
    id_to_index: ItemIndex
    popularity: np.ndarray
    item_features: ItemFeatures
    retrieval: ort.InferenceSession
    items: np.ndarray
    index: faiss.Index
    prerank_user: ort.InferenceSession
    prerank_items: np.ndarray
    prerank_features: dict[str, Any]
    rerank: ort.InferenceSession | None = None
    rerank_items: np.ndarray | None = None
    item2item: Item2ItemRoute | None = None  # None: a version without the route (files.item2item)
    pair_tables: PairTables | None = None  # None: a version without pair features (files.pair_items)

    @property
    def num_items(self) -> int:
        return int(self.item_ids.shape[0]) - 1

    @property
    def maxlen(self) -> int:
        if self.manifest.dims.maxlen is None:
            raise ArtifactError(f"{self.path / MANIFEST}: dims.maxlen is missing")
        return self.manifest.dims.maxlen


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """CPU ONNX Runtime session with `threads` intra-op threads (the service shares 2 cores)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def current_version(artifacts_root: str | Path) -> str:
    """The name in artifacts_root/CURRENT (service/contract/layout.read_current)."""
    try:
        name = read_current(artifacts_root)
    except ContractError as exc:
        raise ArtifactError(str(exc)) from None
    if name is None:
        raise ArtifactError(f"{Path(artifacts_root) / CURRENT}: no CURRENT file (nothing published yet?)")
    return name


def version_folder(artifacts_root: str | Path, name: str) -> Path:
    """artifacts_root/name resolved to its real path, which must be a folder inside the real
    artifacts root (a version folder that is a symlink to elsewhere is refused)."""
    root = Path(artifacts_root).resolve()
    folder = (root / name).resolve()
    if folder.parent != root:
        raise ArtifactError(f"{Path(artifacts_root) / name}: version {name} resolves outside the artifacts root")
    return folder


def load_current(artifacts_root: str | Path, mmap: bool = True) -> LoadedVersion:
    """Load the version that artifacts_root/CURRENT names."""
    root = Path(artifacts_root)
    return load_version(version_folder(root, current_version(root)), mmap=mmap)


def load_version(path: str | Path, mmap: bool = True) -> LoadedVersion:
    """Load and validate the version folder `path`; raises ArtifactError on any problem.

    mmap: map the arrays and the index read-only (see the module docstring); False reads them
    into memory (the same values).

    Whatever goes wrong while a file is read or checked (an ArtifactError from the checks, or any
    other exception from json / NumPy / zipfile / FAISS / ONNX Runtime on a corrupt file) comes
    out as one ArtifactError naming the folder and the file.
    """
    folder = Path(path)
    reading = [MANIFEST]  # the file being read, for the message of an unexpected error

    @contextmanager
    def file(name: str) -> Iterator[None]:
        reading[0] = name
        yield

    try:
        return _load(folder, file, mmap)
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001  any failure of any kind is a version we cannot serve
        raise ArtifactError(f"{folder}: {reading[0]} does not load: {type(exc).__name__}: {exc}") from exc


def _load(folder: Path, file: Callable[[str], AbstractContextManager[None]], mmap: bool) -> LoadedVersion:
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such version folder")
    _confined(folder, "manifest", MANIFEST)
    try:
        manifest = Manifest.load(folder / MANIFEST)
    except ContractError as exc:
        raise ArtifactError(str(exc)) from None
    _finite_json(folder, MANIFEST, manifest.to_dict())
    files, dims, n = manifest.files, manifest.dims, manifest.item_count
    # retrieval.onnx.data (optional): the graph's weights, which ONNX Runtime maps from there
    for role in needed_files(manifest):
        name = files.name(role)
        _confined(folder, role, name)
        if not (folder / name).is_file():
            raise ArtifactError(f"{folder}: {name} (files.{role}) is missing")

    with file(files.name("items")):
        items = _load_npy(folder, files.name("items"), (n, dims.retrieval_dim), mmap)
    index_file = files.name("index")
    with file(index_file):
        try:
            # threads: RECSYS_COMPUTE_THREADS (main.py)
            index = load_index(folder / index_file, num_threads=None, mmap=mmap,
                               expect=manifest.index.search_settings())
        except (RuntimeError, ValueError) as exc:
            raise ArtifactError(f"{folder}: {index_file} does not load: {exc}") from None
        if int(index.ntotal) != n or int(index.d) != items.shape[1]:
            raise ArtifactError(f"{folder}: {index_file} holds {index.ntotal} vectors of D={index.d}, "
                                f"expected item_count={n} of D={items.shape[1]}")
        bad = nonfinite_vector(index)
        if bad is not None:
            raise ArtifactError(f"{folder}: {index_file} holds a non-finite vector (NaN or inf) at {bad}")
    with file(files.name("catalog")):
        catalog = _load_catalog(folder / files.name("catalog"), n, mmap)
        item_ids, popularity = catalog.item_ids, catalog.popularity
        for name, col in catalog.features.numeric.items():
            _finite_rows(folder, f"{files.name('catalog')} num:{name}", col)

    with file(files.name("prerank_items")):
        heads = dims.prerank_item_heads or (None, None)
        prerank_items = _load_npy(folder, files.name("prerank_items"), (n + 1, *heads), mmap)
    rerank = rerank_items = None
    if manifest.has_rerank:
        with file(files.name("rerank_onnx")):
            rerank = _session(folder, files.name("rerank_onnx"))
        with file(files.name("rerank_items")):
            rerank_items = _load_npy(folder, files.name("rerank_items"), (n + 1, dims.rerank_item_dim), mmap)
    features_file = files.name("prerank_features")
    with file(features_file):
        prerank_features = _read_json(folder / features_file)
        _finite_json(folder, features_file, prerank_features)
        missing = [k for k in ("user", "history_len") if not isinstance(prerank_features, dict) or k not in prerank_features]
        if missing:
            raise ArtifactError(f"{folder}: {features_file} is not a feature spec (missing {missing})")
    item2item = None
    if files.has("item2item"):  # optional: older versions serve without the route
        with file(files.name("item2item")):
            with np.load(folder / files.name("item2item"), allow_pickle=False) as z:
                settings = manifest.item2item.serving if manifest.item2item is not None else None
                item2item = Item2ItemRoute.from_arrays(dict(z), n, settings)
            _finite_rows(folder, f"{files.name('item2item')} scores", item2item.scores)
    pair_tables = None
    if files.has("pair_items"):  # optional: versions before the pair features
        with file(files.name("pair_items")):
            pair_items = _load_npy(folder, files.name("pair_items"), (n + 1, len(PAIR_ITEMS_COLUMNS)), mmap)
            pair_tables = PairTables(pair_items, category_codes(catalog.features, n),
                                     None if item2item is None else item2item.neighbours,
                                     None if item2item is None else item2item.scores)
    with file(files.name("retrieval_onnx")):
        retrieval = _session(folder, files.name("retrieval_onnx"))
    with file(files.name("prerank_user_onnx")):
        prerank_user = _session(folder, files.name("prerank_user_onnx"))
    loaded = LoadedVersion(
        version=manifest.version, path=folder, manifest=manifest, item_ids=item_ids,
        id_to_index=ItemIndex(item_ids),
        popularity=popularity, item_features=catalog.features,
        retrieval=retrieval, items=items, index=index,
        prerank_user=prerank_user, prerank_items=prerank_items,
        prerank_features=prerank_features, rerank=rerank, rerank_items=rerank_items, item2item=item2item,
        pair_tables=pair_tables,
    )
    logger.info("loaded version %s from %s: %d items, index %s", loaded.version, folder, n, manifest.index.kind)
    return loaded


def smoke_run(v: LoadedVersion, k: int = 10) -> dict[str, tuple[int, ...]]:
    """Run every stage once on a short made-up history with `k` candidates (the service's
    largest, service/smoke.py); raise ArtifactError on a shape problem or a non-finite output.

    Returns the output shape of each stage (for logs and the publish report).
    """
    n, dims, files = v.num_items, v.manifest.dims, v.manifest.files
    hist = (np.arange(min(3, n), dtype=np.int64) + 1)[None, :]  # (1, L)
    shapes: dict[str, tuple[int, ...]] = {}

    def finite(what: str, out: np.ndarray) -> None:
        if not np.isfinite(out).all():
            raise ArtifactError(f"{v.path}: {what} returned non-finite values (NaN or inf) at k={min(k, n)}")

    try:
        users = v.retrieval.run(None, {"item_seq": hist})[0]  # (1, M, D)
        _expect(f"{files.retrieval_onnx} user_vectors", users.shape, (1, dims.num_launchers, dims.retrieval_dim))
        finite(f"{files.retrieval_onnx} user_vectors", users)
        hits = search_fused(v.index, users, min(k, n))
        shapes["retrieval"] = tuple(users.shape)
        cand = hits.user(0)[0]
        finite(f"{files.index} search", hits.user(0)[1])
        feeds = {}
        for inp in v.prerank_user.get_inputs():
            width = inp.shape[1]
            dtype = np.int64 if "int64" in inp.type else np.float32
            feeds[inp.name] = np.zeros((1, width if isinstance(width, int) else 1), dtype=dtype)
        heads = v.prerank_user.run(None, feeds)[0]  # (1, L, H, d)
        _expect(f"{files.prerank_user_onnx} user_heads", heads.shape[:1] + heads.shape[-1:], (1, v.prerank_items.shape[-1]))
        finite(f"{files.prerank_user_onnx} user_heads", heads)
        scores = score_candidates(heads[0], v.prerank_items, cand)  # (C,)
        finite(f"{files.prerank_user_onnx} x {files.prerank_items} scores", scores)
        shapes["prerank"] = tuple(heads.shape)
        if v.rerank is not None and v.rerank_items is not None and v.manifest.rerank is not None:
            pv_width = int(v.rerank.get_inputs()[1].shape[2])
            L = min(cand.size, v.manifest.rerank.max_len)
            cand, scores = cand[:L], scores[:L]
            n_scores = v.manifest.rerank.num_scores
            # (1, L), or (1, L, S) for a re-ranker that also reads the retrieval score
            init = np.repeat(scores[None, :, None], n_scores, axis=2) if n_scores > 1 else scores[None]
            feats = v.rerank_items[cand].astype(np.float32)  # (L, F); zeros for pair features (F + P wide)
            width = int(v.rerank.get_inputs()[0].shape[2])
            feats = np.concatenate([feats, np.zeros((feats.shape[0], max(width - feats.shape[1], 0)), np.float32)], 1)
            out = v.rerank.run(None, {
                "item_feats": feats[None],
                "pv": np.zeros((1, L, pv_width), np.float32),
                "init_score": init.astype(np.float32),
                "mask": np.ones((1, L), bool),
            })[0]
            _expect(f"{files.rerank_onnx} scores", out.shape, (1, L))
            finite(f"{files.rerank_onnx} scores", out)
            shapes["rerank"] = tuple(out.shape)
    except ArtifactError:
        raise
    except _SMOKE_ERRORS as exc:
        raise ArtifactError(f"{v.path}: smoke run failed: {exc}") from None
    return shapes


# --- helpers ---


def _read_json(path: Path) -> Any:
    try:
        return read_json(path)
    except ContractError as exc:
        raise ArtifactError(str(exc)) from None


def _confined(folder: Path, key: str, name: str) -> None:
    """files.<key> (a plain file name: checked by the manifest) must not be a symlink out of `folder`."""
    if (folder / name).resolve().parent != folder.resolve():
        what = MANIFEST if key == "manifest" else f"{MANIFEST}: files.{key} = {name!r}"
        raise ArtifactError(f"{folder}/{what} resolves outside the version folder")


def _load_catalog(path: Path, n: int, mmap: bool) -> CatalogArrays:
    try:
        if mmap:
            arrays = map_npz(path)
        else:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{path}: does not load: {exc}") from None
    try:
        return CatalogArrays.from_arrays(arrays, n)
    except CatalogError as exc:
        raise ArtifactError(f"{path}: {exc}") from None


def _load_npy(folder: Path, name: str, shape: tuple[int | None, ...], mmap: bool = True) -> np.ndarray:
    try:
        arr = np.asarray(np.load(folder / name, allow_pickle=False, mmap_mode="r" if mmap else None))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{folder}: {name} does not load: {exc}") from None
    if arr.dtype != np.float32:
        raise ArtifactError(f"{folder}: {name} has dtype {arr.dtype}, expected float32")
    if arr.ndim != len(shape) or any(w is not None and a != w for a, w in zip(arr.shape, shape)):
        want = "(" + ", ".join("?" if w is None else str(w) for w in shape) + ")"
        raise ArtifactError(f"{folder}: {name} has shape {arr.shape}, expected {want} from the manifest")
    _finite_rows(folder, name, arr)
    return arr


def _finite_rows(folder: Path, what: str, arr: np.ndarray) -> None:
    """ArtifactError naming the file and the first row of `arr` that holds NaN or inf."""
    row = first_nonfinite_row(arr)
    if row is not None:
        raise ArtifactError(f"{folder}: {what} holds a non-finite value (NaN or inf) in row {row}")


def _finite_json(folder: Path, name: str, obj: Any) -> None:
    """ArtifactError naming the file and the field of the first non-finite number in `obj`."""
    bad = first_nonfinite(obj)
    if bad is not None:
        path, value = bad
        raise ArtifactError(f"{folder}: {name}: {'.'.join(map(str, path))} = {value} is not a finite number")


def _session(folder: Path, name: str) -> ort.InferenceSession:
    try:
        return session(folder / name)
    except ORT_ERRORS as exc:
        raise ArtifactError(f"{folder}: {name} does not load in ONNX Runtime: {exc}") from None


def _expect(what: str, got: tuple[int, ...], want: tuple[int | None, ...]) -> None:
    if tuple(got) != tuple(want):
        raise ArtifactError(f"{what} has shape {tuple(got)}, expected {tuple(want)}")
