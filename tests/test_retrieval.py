"""Retrieval: corpus reading and chunking, BM25 that finds an item's passage from a question about it, the index cache
(reused while the corpus is unchanged, rebuilt when a file is edited, added or removed, never read half-built),
dense retrieval with a local encoder, and `generate` / `chat` with --retrieve on the tiny model."""

import json
import re
from pathlib import Path

import pytest
from conftest import read_jsonl, write_jsonl

from rlhf_kit.data.loading import DataError
from rlhf_kit.inference import retrieval
from rlhf_kit.inference.generation import Conversation
from rlhf_kit.inference.retrieval import (INDEX_SUFFIX, Passage, Retriever, chunk_text, plural_stem, read_corpus,
                                          recall_at_k, with_retrieval)

ITEMS = ["lamp", "mug", "chair", "table", "pen", "notebook", "battery", "box", "glass", "dish", "candle", "clock",
         "fan", "kettle", "pillow", "plate", "rug", "scarf", "shoe", "sock", "spoon", "towel", "umbrella", "vase",
         "watch"]
PLURAL = {"battery": "batteries", "box": "boxes", "glass": "glasses", "dish": "dishes", "watch": "watches"}


def catalog(path: Path) -> Path:
    """The shop's kind of catalog: one passage per item, its price and stock, the item named in the plural too."""
    rows = [{"text": f"The {item} costs {i + 3} dollars. There are {i % 7 + 2} {PLURAL.get(item, item + 's')} in "
                     "stock.", "title": item} for i, item in enumerate(ITEMS)]
    write_jsonl(path, rows)
    return path


def test_chunks_merge_paragraphs_up_to_the_budget_and_split_long_ones_at_sentences():
    assert chunk_text("one two\n\nthree four\n\n\nfive six seven", chunk_words=4) == ["one two\n\nthree four",
                                                                                      "five six seven"]
    long = "A b c. D e f. G h i j k l."
    assert chunk_text(long, chunk_words=6) == ["A b c. D e f.", "G h i j k l."]
    assert chunk_text(long, chunk_words=2) == ["A b", "c.", "D e", "f.", "G h", "i j", "k l."]
    assert chunk_text("  Spread\nover   lines.  ", chunk_words=200) == ["Spread over lines."]
    with pytest.raises(ValueError, match="chunk_words must be >= 1"):
        chunk_text("x", chunk_words=0)


def test_a_directory_corpus_is_read_recursively_in_order_skipping_hidden_files(tmp_path):
    corpus = tmp_path / "docs"
    (corpus / "b").mkdir(parents=True)
    (corpus / ".git").mkdir()
    (corpus / "b" / "two.md").write_text("Second.")
    (corpus / "a.txt").write_text("First.")
    (corpus / "empty.txt").write_text("\n")
    (corpus / ".hidden.txt").write_text("Not read.")
    (corpus / ".git" / "x.txt").write_text("Not read.")
    (corpus / "image.png").write_bytes(b"\x89PNG")
    assert read_corpus(corpus) == [("First.", "a", "a.txt"), ("Second.", "two", "b/two.md")]
    retriever = Retriever.from_corpus(corpus)
    assert retriever.index_path.parent == corpus / INDEX_SUFFIX  # inside it, hidden: never read as a document
    assert read_corpus(corpus) == [("First.", "a", "a.txt"), ("Second.", "two", "b/two.md")]
    assert [p.id for p in retriever.chunks] == ["a.txt#0", "b/two.md#0"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"body": "x"}\n', r"row 2: field 'text': missing \(the row has \['body'\]\); name the text "),
    ('{"text": "ok"}\n{"text": 3}\n', "row 2: field 'text': expected non-empty text, got int"),
    ('{"text": "ok", "title": ["a"]}\n', "row 1: field 'title': expected text, got list"),
    ('{"text": "ok"}\n{"text": \n', "row 2: invalid JSON"),
    ("", "has no rows"),
])
def test_a_bad_corpus_row_is_named_by_file_row_and_field(tmp_path, content, message):
    path = tmp_path / "corpus.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        Retriever.from_corpus(path)


def test_a_missing_or_unreadable_corpus_says_what_to_give(tmp_path):
    with pytest.raises(DataError, match="does not exist: give a directory of .txt/.md files"):
        read_corpus(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no non-empty .txt or .md files"):
        read_corpus(tmp_path / "empty")
    (tmp_path / "table.csv").write_text("text\nx\n")
    with pytest.raises(DataError, match="unknown file type"):
        read_corpus(tmp_path / "table.csv")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin.txt: not UTF-8"):
        read_corpus(tmp_path / "latin.txt")
    write_jsonl(tmp_path / "rows.jsonl", [{"content": "x"}])
    assert read_corpus(tmp_path / "rows.jsonl", text_field="content") == [("x", "", "rows.jsonl:1")]
    with pytest.raises(ValueError, match="dense retrieval needs an embedding_model"):
        Retriever.from_corpus(tmp_path / "rows.jsonl", method="dense")


def test_plural_stem_maps_singular_and_plural_together():
    assert [plural_stem(w) for w in ["lamps", "boxes", "batteries", "glasses", "dishes", "watches", "costs"]] == \
        ["lamp", "box", "battery", "glass", "dish", "watch", "cost"]
    assert [plural_stem(w) for w in ["glass", "bus", "this", "gas", "lamp"]] == ["glass", "bus", "this", "gas",
                                                                                    "lamp"]


def test_a_question_about_an_item_finds_its_passage_first(tmp_path):
    retriever = Retriever.from_corpus(catalog(tmp_path / "catalog.jsonl"))
    found = retriever.search(["How much does the lamp cost?"], k=3)[0]
    assert found[0].text == "The lamp costs 3 dollars. There are 2 lamps in stock."
    assert (found[0].title, found[0].source, found[0].chunk) == ("lamp", "catalog.jsonl:1", 0)
    assert found[0].score > 0 and [p.score for p in found] == sorted((p.score for p in found), reverse=True)
    # Every item, asked about in the singular and the plural: recall@1 is 1.
    questions = [f"How much does the {item} cost?" for item in ITEMS]
    questions += [f"How many {PLURAL.get(item, item + 's')} are in stock?" for item in ITEMS]
    results = retriever.search(questions, k=1)
    assert recall_at_k(results, [{f"catalog.jsonl:{i % len(ITEMS) + 1}"} for i in range(len(questions))]) == 1.0
    # A question sharing no word with the corpus finds nothing rather than noise; so does one of stopwords alone.
    assert retriever.search(["zebra?", "is it the one"], k=3) == [[], []]
    with pytest.raises(ValueError, match="k \\(passages per query\\) must be >= 1"):
        retriever.search(["lamp"], k=0)


def test_recall_at_k_is_the_share_of_needed_passages_found_per_query():
    lamp, mug = Passage("The lamp.", "lamp", "a.txt", 0), Passage("The mug.", "mug", "b.txt", 1)
    # query 1: both needed found (1); query 2: one of two (by id and by text) (0.5); query 3: none (0). Mean 0.5.
    assert recall_at_k([[lamp, mug], [mug], []], [{"a.txt", "b.txt#1"}, {"The mug.", "a.txt"}, {"a.txt"}]) == 0.5
    with pytest.raises(ValueError, match="2 results but 1 sets"):
        recall_at_k([[lamp], [mug]], [{"a.txt"}])


def test_with_retrieval_queries_the_last_user_message_of_any_prompt(tmp_path):
    retriever = Retriever.from_corpus(catalog(tmp_path / "catalog.jsonl"))
    messages = [{"role": "user", "content": "How much is the mug?"}, {"role": "assistant", "content": "4."},
                {"role": "user", "content": "And the kettle?"}]
    given = Conversation([{"role": "user", "content": "What about the vase?"}], [{"text": "Mine.", "title": "x"}])
    out = with_retrieval(["How much does the lamp cost?", messages, given], retriever, k=1)
    assert [c.documents[-1]["title"] for c in out] == ["lamp", "kettle", "vase"]
    assert out[0].messages == [{"role": "user", "content": "How much does the lamp cost?"}]
    assert out[1].messages == messages and out[2].documents[0] == {"text": "Mine.", "title": "x"}
    assert set(out[0].documents[0]) == {"text", "title", "source", "chunk", "score"}


def test_the_index_is_reused_until_the_corpus_changes(tmp_path, monkeypatch):
    corpus = tmp_path / "shop"
    corpus.mkdir()
    (corpus / "lamp.txt").write_text("The lamp costs 12 dollars.")
    (corpus / "mug.txt").write_text("The mug costs 3 dollars.")
    first = Retriever.from_corpus(corpus)
    assert first.built and (first.index_path / retrieval.KEY_FILE).is_file()

    builds = []
    real_build = retrieval._build_index
    monkeypatch.setattr(retrieval, "_build_index", lambda *a: builds.append(1) or real_build(*a))
    again = Retriever.from_corpus(corpus)
    assert not again.built and not builds and again.key == first.key and again.index_path == first.index_path
    assert again.search(["lamp"], 1)[0][0].source == "lamp.txt"

    keys = {first.key}
    for change in (lambda: (corpus / "lamp.txt").write_text("The lamp costs 14 dollars."),  # edited
                   lambda: (corpus / "pen.md").write_text("The pen costs 1 dollar."),  # added
                   lambda: (corpus / "mug.txt").unlink()):  # removed
        change()
        changed = Retriever.from_corpus(corpus)
        assert changed.built and changed.key not in keys
        keys.add(changed.key)
        # The stale index is replaced, not kept beside the new one.
        assert [d.name for d in (corpus / INDEX_SUFFIX).iterdir()] == [changed.index_path.name]
    assert [p.source for p in changed.chunks] == ["lamp.txt", "pen.md"]
    assert changed.search(["pen"], 1)[0][0].text == "The pen costs 1 dollar."
    assert len(builds) == 3
    # Other chunking is another index.
    assert Retriever.from_corpus(corpus, chunk_words=3).key not in keys


def test_an_interrupted_build_is_never_read_and_an_unwritable_place_uses_the_cache(tmp_path, monkeypatch):
    path = catalog(tmp_path / "catalog.jsonl")

    def killed(self, directory, **kwargs):  # the build dies after writing part of the index
        Path(directory, "data.csc.index.npy").write_bytes(b"half")
        raise KeyboardInterrupt

    import bm25s

    monkeypatch.setattr(bm25s.BM25, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        Retriever.from_corpus(path)
    monkeypatch.undo()
    beside = tmp_path / f"catalog.jsonl{INDEX_SUFFIX}"
    assert [d.name.startswith(".building-bm25-") for d in beside.iterdir()] == [True]  # only the staging directory
    rebuilt = Retriever.from_corpus(path)
    assert rebuilt.built and rebuilt.search(["lamp"], 1)[0][0].title == "lamp"

    # Where nothing can be written beside the corpus, the index goes to $RLHF_KIT_CACHE.
    cache = tmp_path / "cache"
    monkeypatch.setenv("RLHF_KIT_CACHE", str(cache))
    other = catalog(tmp_path / "readonly" / "catalog.jsonl")
    real_mkdtemp = retrieval.tempfile.mkdtemp

    def refuse_beside(prefix, dir):
        if not Path(dir).is_relative_to(cache):
            raise PermissionError(13, "Permission denied", dir)
        return real_mkdtemp(prefix=prefix, dir=dir)

    monkeypatch.setattr(retrieval.tempfile, "mkdtemp", refuse_beside)
    cached = Retriever.from_corpus(other)
    assert cached.index_path.is_relative_to(cache / retrieval.RETRIEVAL_CACHE) and cached.built
    assert not Retriever.from_corpus(other).built  # and found there next time


def tiny_encoder(path: Path, seed: int = 0) -> str:
    """A random 2-layer BERT and a word-level tokenizer, saved like a Hub encoder (no download)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = sorted({w for item in ITEMS for w in f"the {item} costs dollars there are in stock".split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words, *map(str, range(40))])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    return str(path)


def test_dense_retrieval_with_a_local_encoder_finds_an_exact_duplicate_first(tmp_path):
    encoder = tiny_encoder(tmp_path / "encoder")
    rows = [{"text": f"the {item} costs {i} dollars"} for i, item in enumerate(ITEMS)]
    write_jsonl(tmp_path / "corpus.jsonl", rows)
    dense = Retriever.from_corpus(tmp_path / "corpus.jsonl", method="dense", embedding_model=encoder)
    found = dense.search([rows[5]["text"], rows[17]["text"]], k=3)
    assert [r[0].source for r in found] == ["corpus.jsonl:6", "corpus.jsonl:18"]
    assert found[0][0].score == pytest.approx(1.0, abs=1e-5)  # normalized: a duplicate's cosine is 1
    assert not Retriever.from_corpus(tmp_path / "corpus.jsonl", method="dense", embedding_model=encoder).built
    bm25 = Retriever.from_corpus(tmp_path / "corpus.jsonl")  # its own index beside the dense one
    assert bm25.built and bm25.key != dense.key
    # Another encoder is another index.
    other = tiny_encoder(tmp_path / "encoder2", seed=1)
    assert Retriever.from_corpus(tmp_path / "corpus.jsonl", method="dense", embedding_model=other).key != dense.key


# ------------------------------------------------------------------------------------------------ commands


@pytest.fixture
def rendered(monkeypatch):
    """The text of every prompt the model is given."""
    from rlhf_kit.inference import generation

    texts, real_render = [], generation.render

    def recording(tokenizer, prompt, prompting=None):
        ids = real_render(tokenizer, prompt, prompting)
        texts.append(tokenizer.decode(ids))
        return ids

    monkeypatch.setattr(generation, "render", recording)
    return texts


def test_generate_with_retrieve_answers_from_the_passages_and_records_them(tiny_base, tmp_path, rendered,
                                                                          single_thread, capsys):
    from rlhf_kit.cli import main
    from rlhf_kit.inference.batch import REFLECT_QUESTION, generate_responses

    corpus = catalog(tmp_path / "catalog.jsonl")
    questions = ["How much does the lamp cost?", "How many mugs are in stock?", "Is the kettle in stock?"]
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in questions])
    out = tmp_path / "out.jsonl"
    command = [tiny_base, "--prompts", str(tmp_path / "prompts.jsonl"), "--output", str(out), "--max_new_tokens",
               "4", "--batch_size", "2", "--retrieve", str(corpus), "--top_k", "2"]
    assert main(["generate", *command]) == 0
    rows = read_jsonl(out)
    assert [r["prompt"] for r in rows] == questions
    assert [r["passages"][0]["title"] for r in rows] == ["lamp", "mug", "kettle"]
    assert all(len(r["passages"]) == 2 and set(r["passages"][0]) == {"text", "title", "source", "score"}
               for r in rows)
    lamp = rows[0]["passages"][0]
    assert lamp == {"text": "The lamp costs 3 dollars. There are 2 lamps in stock.", "title": "lamp",
                    "source": "catalog.jsonl:1", "score": lamp["score"]}
    # The model was given them, as the system message training data writes.
    assert len(rendered) == 3
    second = rows[0]["passages"][1]["text"]
    assert f"<|im_start|>system\nDocuments:\n[1] {lamp['text']}\n[2] {second}<|im_end|>" in rendered[0]
    assert "How much does the lamp cost?" in rendered[0]
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    assert meta["retrieval"]["top_k"] == 2 and meta["retrieval"]["index_key"] == Retriever.from_corpus(corpus).key

    # Resuming with an edited corpus is refused: the passages would differ from the rows already written.
    with open(out, "r+") as f:
        f.truncate(len(f.readline()))
    rows = read_jsonl(corpus)
    write_jsonl(corpus, [{**rows[0], "text": "The lamp costs 99 dollars."}, *rows[1:]])
    capsys.readouterr()
    assert main(["generate", *command]) == 2
    assert "written with other settings or prompts (retrieval.index_key was" in capsys.readouterr().err
    write_jsonl(corpus, rows)
    assert main(["generate", *command]) == 0 and len(read_jsonl(out)) == 3
    assert main(["generate", *command[:-4], "--top_k", "2"]) == 2
    assert "--top_k and --embedding_model are settings of retrieval" in capsys.readouterr().err

    # A judge reflecting on an answer sees the passages it was written from; the retried rows keep them too.
    rendered.clear()
    reflected = generate_responses(tiny_base, questions[:1], retrieve=corpus, top_k=1, reflect=1, max_new_tokens=4)
    assert reflected[0]["prompt"] == questions[0] and reflected[0]["passages"][0]["title"] == "lamp"
    assert len(rendered) >= 2 and all("Documents:\n[1] The lamp costs" in text for text in rendered)
    assert any(REFLECT_QUESTION in text for text in rendered)


SHOWN = []


def cites_a_document(prompts, completions, **kwargs):
    """A reward function that records what it was shown."""
    SHOWN.extend(prompts)
    return [0.0] * len(prompts)


def test_select_reward_scores_the_prompt_as_the_model_saw_it_passages_included(tiny_base, tmp_path, single_thread):
    from rlhf_kit.inference.batch import generate_responses

    corpus = catalog(tmp_path / "catalog.jsonl")
    SHOWN.clear()
    rows = generate_responses(tiny_base, ["How much does the lamp cost?"], retrieve=corpus, top_k=1, n=2,
                              select="reward", reward_funcs=[f"{__name__}:cites_a_document"], max_new_tokens=4)
    assert rows[0]["prompt"] == "How much does the lamp cost?" and rows[0]["scores"] == [0.0, 0.0]
    lamp = read_jsonl(corpus)[0]["text"]
    assert len(SHOWN) == 2 and SHOWN[0][0] == {"role": "system", "content": f"Documents:\n[1] {lamp}"}
    assert SHOWN[0][1] == {"role": "user", "content": "How much does the lamp cost?"}


def test_a_bad_corpus_is_one_message_before_any_model_loads(tmp_path, capsys):
    from rlhf_kit.cli import main

    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}])
    write_jsonl(tmp_path / "corpus.jsonl", [{"text": "ok"}, {"body": "x"}])
    (tmp_path / "no-model").mkdir()  # there but empty: loading it would fail, so an error about it comes too late
    for corpus, message in [("nope", "corpus .*nope does not exist"), ("corpus.jsonl", "row 2: field 'text'")]:
        argv = ["generate", str(tmp_path / "no-model"), "--prompts", str(tmp_path / "prompts.jsonl"), "--output",
                str(tmp_path / "out.jsonl"), "--retrieve", str(tmp_path / corpus)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err and len(err.splitlines()) == 1
    assert main(["chat", str(tmp_path / "no-model"), "--retrieve", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_chat_with_retrieve_puts_each_messages_passages_before_it(tiny_base, tmp_path, rendered, single_thread):
    from rlhf_kit.inference.chat import chat

    retriever = Retriever.from_corpus(catalog(tmp_path / "catalog.jsonl"))
    said = []
    history = chat(tiny_base, lines=["How much does the lamp cost?", "And the vase?"], write=said.append,
                   max_new_tokens=4, retriever=retriever, top_k=1)
    assert "(retrieved: lamp [catalog.jsonl:1#0]" in "".join(said)
    assert "Documents:\n[1] The lamp costs 3 dollars." in rendered[0]
    assert "Documents:\n[1] The vase costs" in rendered[1] and "The lamp costs" not in rendered[1].split("user")[0]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]  # passages are not kept
