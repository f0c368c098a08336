"""Retrieval: passages from a corpus put into each prompt, so the model answers from them.

    retriever = Retriever.from_corpus("data/shop/catalog.jsonl")
    retriever.search(["How much does the lamp cost?"], k=3)[0][0].text  # 'The lamp costs 12 dollars. ...'
    conversations = with_retrieval(prompts, retriever, k=3)  # Conversation(messages, documents) per prompt

A corpus is a directory of .txt / .md files (recursive, in sorted order, hidden files and directories skipped), one
such file, or a JSON Lines / JSON file with a text column (`text`, or `text_field`) and optionally a `title`. Its
texts are cut into chunks: paragraphs merged up to `chunk_words` words, a longer paragraph split at sentence ends
(a longer sentence at words). Each chunk keeps its source (the file's path in the directory, or `file:row`), its
index within that source and a title (the file's stem, or the row's title), which is indexed with its text: a file
named lamp.md is about the lamp even where its text says "it".

Search is BM25 (bm25s: no model, offline) by default, or dense (`method="dense"`, a local transformers encoder:
mean-pooled, normalized embeddings, inner product; faiss when installed, numpy otherwise). The index is cached next
to the corpus, `<file>.rlhf-kit-index/` or `<dir>/.rlhf-kit-index/`, or under $RLHF_KIT_CACHE (else the Hugging
Face home) where the corpus location is not writable. It is keyed on what it was built from (the chunks, the
chunking, the method, bm25s's version and the tokenization, the encoder's files): an edited, added or removed file
changes the key and the index is rebuilt. A build is written to a temporary directory and renamed into place, so an
interrupted build is never read as an index.

Tokenization for BM25: bm25s's (lowercase words of 2+ characters), English stopwords dropped, and a small suffix
stripper (`plural_stem`) so that "lamp" in a question finds "lamps" in a passage: bm25s has no stemmer of its own.
PyStemmer's Snowball stemmer would do more, but an optional install that silently changes which passages are found
(and so a task's recall) is worse than a rule that does the same thing everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from rlhf_kit.data.loading import DataError, RowError, json_records
from rlhf_kit.inference.generation import Conversation, user_text
from rlhf_kit.model import cache_dir

CHUNK_WORDS = 200
METHODS = ("bm25", "dense")
TEXT_FILES = (".txt", ".md")
TABLE_FILES = (".jsonl", ".json")
INDEX_SUFFIX = ".rlhf-kit-index"  # `<file>.rlhf-kit-index/` beside a file; `<dir>/.rlhf-kit-index/` in a directory
RETRIEVAL_CACHE = "rlhf_kit_retrieval"  # under cache_dir(), for corpora in places we cannot write to
KEY_FILE = "rlhf_kit_index.json"  # written last into an index: what it was built from
# Part of the index key: changing the tokenization below must rebuild every cached BM25 index.
TOKENIZATION = "bm25s-words-en-stopwords+plural_stem-1"


@dataclass(frozen=True)
class Passage:
    """A chunk of the corpus; `score` is its retrieval score for a query (0 in the chunk list)."""

    text: str
    title: str
    source: str  # the file's path within the corpus directory, or `file:row` for a JSON Lines corpus
    chunk: int = 0  # its index among its source's chunks
    score: float = 0.0

    @property
    def id(self) -> str:
        return f"{self.source}#{self.chunk}"


# ------------------------------------------------------------------------------------------------ corpus


def read_corpus(path: str | Path, *, text_field: str = "text") -> list[tuple[str, str, str]]:
    """The corpus's documents as (text, title, source), in order; DataError naming the file, row and field when one
    cannot be used."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in TEXT_FILES and f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(path).parts))
        documents = [(_read_text(f), f.stem, f.relative_to(path).as_posix()) for f in files]
        documents = [d for d in documents if d[0].strip()]
        if not documents:
            raise DataError(f"corpus {path}: no non-empty {' or '.join(TEXT_FILES)} files in it (hidden ones are "
                            "skipped)")
        return documents
    if not path.is_file():
        raise DataError(f"corpus {path} does not exist: give a directory of {'/'.join(TEXT_FILES)} files or a "
                        f"{'/'.join(TABLE_FILES)} file with a '{text_field}' column")
    suffix = path.suffix.lower()
    if suffix in TEXT_FILES:
        text = _read_text(path)
        if not text.strip():
            raise DataError(f"corpus {path} is empty")
        return [(text, path.stem, path.name)]
    if suffix not in TABLE_FILES:
        raise DataError(f"corpus {path}: unknown file type; give a directory of {'/'.join(TEXT_FILES)} files, one "
                        f"such file, or a {'/'.join(TABLE_FILES)} file with a '{text_field}' column")
    documents = []
    try:
        for n, row in json_records(str(path)):
            documents.append((_field(row, text_field, path, n), _title(row, path, n), f"{path.name}:{n}"))
    except UnicodeDecodeError:
        raise DataError(f"corpus {path}: not UTF-8 text; save the file as UTF-8") from None
    if not documents:
        raise DataError(f"corpus {path} has no rows")
    return documents


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"corpus file {path}: not UTF-8 text; save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") \
            from None


def _field(row: dict, name: str, path: Path, n: int) -> str:
    value = row.get(name)
    if name not in row:
        problem = f"missing (the row has {sorted(row)}); name the text column with text_field"
    elif not isinstance(value, str) or not value.strip():
        problem = f"expected non-empty text, got {type(value).__name__} {str(value)[:40]!r}"
    else:
        return value
    raise DataError(f"corpus {path}: row {n}: {RowError(name, problem)}")


def _title(row: dict, path: Path, n: int) -> str:
    title = row.get("title", "")
    if not isinstance(title, str):
        raise DataError(f"corpus {path}: row {n}: {RowError('title', f'expected text, got {type(title).__name__}')}")
    return title


def chunk_text(text: str, chunk_words: int = CHUNK_WORDS) -> list[str]:
    """`text` in chunks of at most `chunk_words` words: paragraphs (blank-line separated) merged while they fit, a
    longer paragraph split at sentence ends, a longer sentence at words."""
    if chunk_words < 1:
        raise ValueError(f"chunk_words must be >= 1, got {chunk_words}")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    pieces = []
    for paragraph in paragraphs:
        if len(paragraph.split()) <= chunk_words:
            pieces.append(paragraph)
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
            words = sentence.split()
            pieces += [" ".join(words[i : i + chunk_words]) for i in range(0, len(words), chunk_words)]
    return _merge(pieces, chunk_words, "\n\n" if len(paragraphs) > 1 else " ")


def _merge(pieces: list[str], budget: int, joiner: str) -> list[str]:
    chunks, current, words = [], [], 0
    for piece in pieces:
        size = len(piece.split())
        if current and words + size > budget:
            chunks.append(joiner.join(current))
            current, words = [], 0
        current.append(piece)
        words += size
    return chunks + ([joiner.join(current)] if current else [])


def chunk_corpus(documents: Iterable[tuple[str, str, str]], chunk_words: int = CHUNK_WORDS) -> list[Passage]:
    return [Passage(text, title, source, i) for document, title, source in documents
            for i, text in enumerate(chunk_text(document, chunk_words))]


# ------------------------------------------------------------------------------------------------ BM25


def plural_stem(word: str) -> str:
    """An English plural or third-person -s stripped: lamps -> lamp, boxes -> box, batteries -> battery, costs ->
    cost; glass, bus, this stay. Applied to corpus and query alike, so over-stripping a word is harmless."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("sses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def tokenize(texts: list[str]) -> list[list[str]]:
    """The BM25 tokens of each text: bm25s's words, English stopwords dropped, `plural_stem`med."""
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", stemmer=lambda words: [plural_stem(w) for w in words],
                          return_ids=False, show_progress=False)


# ------------------------------------------------------------------------------------------------ retriever


@dataclass
class Retriever:
    """A searchable corpus; build it with `Retriever.from_corpus`."""

    corpus: str
    chunks: list[Passage]
    method: str
    key: str  # what the index was built from, hashed: recorded with generated files
    index_path: Path
    built: bool  # whether from_corpus built the index (False: it loaded the cached one)
    index: object = None  # a bm25s.BM25, or the chunk embeddings (chunks, dim)
    encoder: tuple | None = None  # (tokenizer, model) for dense search

    @classmethod
    def from_corpus(cls, path: str | Path, *, chunk_words: int = CHUNK_WORDS, method: str = "bm25",
                    embedding_model: str | None = None, text_field: str = "text") -> Retriever:
        """Read and chunk the corpus at `path`, and load its cached index or build (and cache) it."""
        if method not in METHODS:
            raise ValueError(f"retrieval method must be one of {', '.join(METHODS)}, got {method!r}")
        if (method == "dense") != (embedding_model is not None):
            raise ValueError("dense retrieval needs an embedding_model (a local encoder directory), and only dense "
                             "retrieval uses one")
        chunks = chunk_corpus(read_corpus(path, text_field=text_field), chunk_words)
        key = index_key(chunks, chunk_words, method, embedding_model)
        encoder = _load_encoder(embedding_model) if method == "dense" else None
        found = next((d for d in _index_dirs(Path(path), method, key) if _is_index(d, key)), None)
        built = found is None
        if built:
            index = _build_index(chunks, method, encoder)
            found = _save_index(index, Path(path), method, key)
        else:
            index = _load_index(found, method)
        return cls(str(path), chunks, method, key, found, built, index, encoder)

    def search(self, queries: Sequence[str], k: int) -> list[list[Passage]]:
        """The best `k` passages for each query (fewer where fewer match), best first, with their scores."""
        if k < 1:
            raise ValueError(f"k (passages per query) must be >= 1, got {k}")
        k = min(k, len(self.chunks))
        if not queries:
            return []
        if self.method == "dense":
            scores, ids = _dense_search(self.index, _embed(self.encoder, list(queries)), k)
        else:
            scores, ids = _bm25_search(self.index, list(queries), k)
        # A passage sharing no word with the query (BM25 score 0) is noise, not a match: left out.
        return [[replace(self.chunks[i], score=float(s)) for i, s in zip(row_ids, row) if self.method == "dense"
                 or s > 0] for row_ids, row in zip(ids, scores)]


def index_key(chunks: list[Passage], chunk_words: int, method: str, embedding_model: str | None = None) -> str:
    """A hash of everything an index is built from; an index recorded under another key is stale."""
    what = {"chunks": [[c.text, c.title, c.source, c.chunk] for c in chunks], "chunk_words": chunk_words,
            "method": method}
    if method == "bm25":
        import bm25s

        what.update(bm25s=bm25s.__version__, tokenization=TOKENIZATION)
    else:
        what.update(encoder=_encoder_stamp(embedding_model))
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _encoder_stamp(name_or_path: str) -> dict:
    """The encoder by its resolved path and its files' size and time (its weights are too big to hash each run), or
    by its name when it is not a local directory."""
    path = Path(name_or_path)
    if not path.is_dir():
        return {"name": str(name_or_path)}
    files = sorted(f for f in path.iterdir() if f.is_file())
    return {"path": str(path.resolve()), "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}}


def _index_roots(corpus: Path) -> list[Path]:
    """Where the corpus's index may live, in order of preference: beside it, then in the cache directory."""
    corpus = corpus.expanduser().resolve()
    beside = corpus / INDEX_SUFFIX if corpus.is_dir() else corpus.with_name(corpus.name + INDEX_SUFFIX)
    return [beside, cache_dir() / RETRIEVAL_CACHE / corpus.relative_to(corpus.anchor)]


def _index_dirs(corpus: Path, method: str, key: str) -> list[Path]:
    return [root / f"{method}-{key[:16]}" for root in _index_roots(corpus)]


def _is_index(directory: Path, key: str) -> bool:
    try:
        return json.loads((directory / KEY_FILE).read_text())["key"] == key
    except (OSError, ValueError, KeyError):
        return False


def _build_index(chunks: list[Passage], method: str, encoder):
    texts = [f"{c.title}\n{c.text}" if c.title else c.text for c in chunks]  # a file's name is part of what it is about
    if method == "dense":
        return _embed(encoder, texts)
    import bm25s

    index = bm25s.BM25()
    index.index(tokenize(texts), show_progress=False)
    return index


def _save_index(index, corpus: Path, method: str, key: str) -> Path:
    """Write the index into the first root that takes it: into a temporary directory first, renamed into place
    once complete (a killed build leaves only a `.building-*` directory, never read as an index); older indexes of
    the same method there are removed."""
    errors = []
    for final in _index_dirs(corpus, method, key):
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".building-{method}-", dir=final.parent))
            staging.chmod(final.parent.stat().st_mode & 0o777)  # mkdtemp's 0700 would hide it from others
        except OSError as error:  # not writable here: try the cache directory
            errors.append(f"{final.parent}: {error}")
            continue
        if method == "dense":
            np.save(staging / "embeddings.npy", index)
        else:
            index.save(str(staging), show_progress=False)
        (staging / KEY_FILE).write_text(json.dumps({"key": key, "method": method, "corpus": str(corpus)}) + "\n")
        if final.exists():  # a half-removed or foreign directory under our name
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(staging, final)
        except OSError:  # another process put the same index there first
            shutil.rmtree(staging, ignore_errors=True)
        for stale in final.parent.glob(f"{method}-*"):
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)
        return final
    raise OSError(f"the retrieval index of {corpus} could not be written anywhere ({'; '.join(errors)}); set "
                  "RLHF_KIT_CACHE to a writable directory")


def _load_index(directory: Path, method: str):
    if method == "dense":
        return np.load(directory / "embeddings.npy")
    import bm25s

    return bm25s.BM25.load(str(directory), show_progress=False)


def _bm25_search(index, queries: list[str], k: int) -> tuple[list, list]:
    scores, ids = [], []
    for tokens in tokenize(queries):
        if not tokens:  # only stopwords: nothing to match
            scores.append([]), ids.append([])
            continue
        found, found_scores = index.retrieve([tokens], k=k, show_progress=False)
        scores.append(found_scores[0].tolist()), ids.append(found[0].tolist())
    return scores, ids


# ------------------------------------------------------------------------------------------------ dense


def _load_encoder(name_or_path: str) -> tuple:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer, AutoModel.from_pretrained(name_or_path).eval()


def _embed(encoder: tuple, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Mean-pooled, L2-normalized last hidden states (texts, dim), float32: inner products are cosines."""
    import torch

    tokenizer, model = encoder
    limit = min(512, getattr(model.config, "max_position_embeddings", 512))
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=limit,
                              return_tensors="pt").to(model.device)
            hidden = model(**batch).last_hidden_state  # (B, T, dim)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, dim)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy())
    return np.concatenate(out)


def _dense_search(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[list, list]:
    try:
        import faiss
    except ImportError:  # an optional speed-up; a flat inner-product search in numpy gives the same ranking
        scores = queries @ embeddings.T  # (queries, chunks)
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, ids, axis=1).tolist(), ids.tolist()
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(embeddings)
    scores, ids = index.search(queries, k)
    return scores.tolist(), ids.tolist()


# ------------------------------------------------------------------------------------------------ prompts


def with_retrieval(prompts: Sequence, retriever: Retriever, k: int) -> list[Conversation]:
    """Each prompt (a string, chat messages or a Conversation) as a Conversation with its top-`k` passages as
    documents (after any it had); the query is its last user message's text."""
    conversations = [prompt if isinstance(prompt, Conversation) else
                     Conversation([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt))
                     for prompt in prompts]
    found = retriever.search([user_text(c) for c in conversations], k)
    return [Conversation(c.messages, [*c.documents, *map(passage_document, passages)])
            for c, passages in zip(conversations, found)]


def passage_document(passage: Passage) -> dict:
    """A passage as a Conversation document: what the template shows (title, text) and where it came from."""
    return asdict(passage)


def recall_at_k(results: Sequence[Sequence[Passage]], needed: Sequence[Iterable[str]]) -> float:
    """The share of the needed passages found, averaged over queries. `results`: each query's top-k passages (from
    `search`); `needed`: per query, what must be among them, each a passage's source, id (`source#chunk`) or text."""
    if len(results) != len(needed):
        raise ValueError(f"{len(results)} results but {len(needed)} sets of needed passages")
    shares = []
    for passages, wanted in zip(results, needed):
        wanted = set(wanted)
        if not wanted:
            raise ValueError("every query needs at least one passage to find (an empty set has no recall)")
        found = {key for p in passages for key in (p.source, p.id, p.text)}
        shares.append(len(wanted & found) / len(wanted))
    return sum(shares) / len(shares) if shares else 0.0
