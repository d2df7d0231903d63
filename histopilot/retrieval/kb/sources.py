"""Turns ontologies, the OncoTree tumour tree and user documents into citable passages.

A passage is the unit the knowledge base indexes and returns: natural text to embed and to
match words against, plus a ``SourceRef`` precise enough to cite (term id, OncoTree code,
document page and character span). Every reader here fails with ``KnowledgeSourceError``
naming the file, so a bad source stops a build before anything is written.
"""

from __future__ import annotations

import bisect
import json
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import pronto
import pypdf
from pydantic import BaseModel, ConfigDict, Field
from pypdf.errors import PyPdfError

from histopilot.errors import KnowledgeSourceError

SourceKind = Literal["ontology", "oncotree", "document"]
DOCUMENT_SUFFIXES = frozenset({".md", ".markdown", ".txt", ".pdf"})
SUPPORTED_SUFFIXES = DOCUMENT_SUFFIXES | {".obo", ".json"}
#: Chunks of about this many words fit MiniLM's 256-token window with room to spare, and are
#: short enough that a hit points at one idea rather than a whole chapter.
CHUNK_WORDS = 200
#: Words repeated at the start of the next chunk, so a sentence cut by a chunk boundary is
#: still whole in one of the two chunks.
OVERLAP_WORDS = 30
#: Broad synonyms name a wider class ("cancer" for a specific cancer); indexing them would make
#: the general word retrieve every narrow term that carries it.
PASSAGE_SYNONYM_SCOPES = frozenset({"EXACT", "NARROW", "RELATED"})

_SYNONYM_TYPE = re.compile(r'^synonym:\s*"(?:[^"\\]|\\.)*"\s+[A-Z]+\s+([^\s\[]+)\s*\[', re.M)
_RELATION_UNDERSCORE = re.compile(r"(?<=[a-z])_(?=[a-z])")
_MARKDOWN_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$")
_CODE_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_BLANK_LINES = re.compile(r"\n[ \t\r]*\n")
_WORD = re.compile(r"\S+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


class SourceRef(BaseModel):
    """Where a passage came from, precisely enough to cite and to open at the right place."""

    model_config = ConfigDict(frozen=True)

    kind: SourceKind
    file: str = Field(description="File name of the source (no folder: KBs move between hosts).")
    ontology_id: str | None = Field(None, description="Term id, e.g. DOID:0001816.")
    code: str | None = Field(None, description="OncoTree code, e.g. LUAD.")
    xrefs: list[str] = Field(default_factory=list, description="e.g. ICDO:9120/3, NCI:C3088.")
    page: int | None = Field(None, ge=1, description="1-based PDF page.")
    char_start: int | None = Field(None, ge=0, description="Start offset in the document text.")
    char_end: int | None = Field(None, ge=0, description="End offset (exclusive).")


class Passage(BaseModel):
    """One retrievable unit: ``text`` is what gets embedded and matched word by word."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="Stable id: DOID:…, oncotree:CODE or doc:<file>#<chunk>.")
    title: str
    text: str
    source: SourceRef


# --- Ontologies ---------------------------------------------------------------------------


def read_ontology(path: str | Path) -> pronto.Ontology:
    """Parse an OBO file, turning parser failures into errors that name the file and line."""
    path = _existing_file(path, "ontology")
    try:
        with warnings.catch_warnings():
            # pronto warns about every header clause it does not model; none matter here.
            warnings.simplefilter("ignore")
            # import_depth=0: an ``import:`` header must never make a build reach the network.
            ontology = pronto.Ontology(str(path), import_depth=0)
    except SyntaxError as error:
        where = f" at line {error.lineno}" if error.lineno else ""
        line = f" ({error.text.strip()!r})" if error.text else ""
        raise KnowledgeSourceError(
            f"the ontology {path} is not valid OBO{where}{line}: {error.msg}; fix or remove that "
            "stanza, or download the file again."
        ) from error
    except (ValueError, OSError) as error:
        raise KnowledgeSourceError(
            f"the ontology {path} cannot be read ({error}); give an OBO 1.2/1.4 file."
        ) from error
    _declare_synonym_types(ontology, path)
    return ontology


def _declare_synonym_types(ontology: pronto.Ontology, path: Path) -> None:
    """Declare synonym types that terms use but the header does not.

    The Disease Ontology tags acronyms with ``OMO:0003012`` without a ``synonymtypedef``
    header line, and pronto refuses to show such synonyms at all. The type is only a label,
    so declaring it keeps every synonym readable.
    """
    declared = {synonym_type.id for synonym_type in ontology.synonym_types()}
    text = path.read_text(encoding="utf-8", errors="replace")
    for type_id in sorted(set(_SYNONYM_TYPE.findall(text)) - declared):
        ontology.metadata.synonymtypedefs.add(pronto.SynonymType(type_id, type_id))


def live_terms(ontology: pronto.Ontology) -> list[pronto.Term]:
    """Named, non-obsolete terms, the ones worth a passage, sorted by id.

    pronto parses frames in parallel threads, so its own order changes from run to run.
    """
    terms = [term for term in ontology.terms() if not term.obsolete and term.name]
    return sorted(terms, key=lambda term: term.id)


def load_obo(path: str | Path, *, include_synonyms: bool = True) -> list[Passage]:
    """One passage per live term: name, definition or parent names, synonyms (optional)."""
    path = Path(path)
    passages = ontology_passages(read_ontology(path), path.name, include_synonyms=include_synonyms)
    if not passages:
        raise KnowledgeSourceError(
            f"the ontology {path} holds no named, non-obsolete terms; check that it is the "
            "ontology you meant."
        )
    return passages


def ontology_passages(
    ontology: pronto.Ontology, file: str, *, include_synonyms: bool = True
) -> list[Passage]:
    """``load_obo`` for an ontology already parsed (by ``read_ontology``) from ``file``."""
    return [
        _term_passage(term, file, include_synonyms=include_synonyms)
        for term in live_terms(ontology)
    ]


def _term_passage(term: pronto.Term, file: str, *, include_synonyms: bool) -> Passage:
    name = term.name.strip()
    sentences = [f"{name}."]
    if term.definition:
        # Definitions spell relations as identifiers ("derives_from"); words read better.
        sentences.append(_RELATION_UNDERSCORE.sub(" ", str(term.definition).strip()))
    if include_synonyms:
        synonyms = sorted(
            {
                synonym.description.strip()
                for synonym in term.synonyms
                if synonym.scope in PASSAGE_SYNONYM_SCOPES
                and synonym.description.strip().casefold() != name.casefold()
            },
            key=str.casefold,
        )
        if synonyms:
            sentences.append(f"Also called {'; '.join(synonyms)}.")
    if not term.definition:
        # A definition already names the parent (Disease Ontology definitions read "A <parent>
        # that ..."); spelling parents out again makes every child match its parent's name.
        parents = sorted(filter(None, (p.name for p in term.superclasses(1, with_self=False))))
        if parents:
            sentences.append(f"A kind of {' and '.join(parents)}.")
    return Passage(
        id=term.id,
        title=name,
        text=" ".join(
            sentence if sentence.endswith(".") else f"{sentence}." for sentence in sentences
        ),
        source=SourceRef(
            kind="ontology",
            file=file,
            ontology_id=term.id,
            xrefs=sorted(xref.id for xref in term.xrefs),
        ),
    )


# --- OncoTree -----------------------------------------------------------------------------


def load_oncotree(path: str | Path) -> list[Passage]:
    """One passage per tumour type, with its tissue, main type and chain of parents.

    The synthetic root ("Tissue") names no tumour type and gets no passage.
    """
    path = _existing_file(path, "OncoTree file")
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise KnowledgeSourceError(
            f"the OncoTree file {path} is not valid JSON ({error}); download the tree again "
            "from the OncoTree API (tumorTypes/tree)."
        ) from error
    if not _is_oncotree(tree):
        raise KnowledgeSourceError(
            f"{path} is JSON but not an OncoTree tree (expected {{'TISSUE': {{'code', 'name', "
            "'children', ...}}}}); give the tree export of the OncoTree API."
        )
    try:
        return [
            _oncotree_passage(node, chain, path.name)
            for root in tree.values()
            for node, chain in _walk_oncotree(root, [], path)
        ]
    except (RecursionError, TypeError, AttributeError, KeyError, ValueError) as error:
        raise KnowledgeSourceError(
            f"{path} has a malformed OncoTree node ({type(error).__name__}: {error}); give the "
            "tree export of the OncoTree API."
        ) from error


def _is_oncotree(tree: Any) -> bool:
    return (
        isinstance(tree, dict)
        and bool(tree)
        and all(
            isinstance(root, dict) and {"code", "children"} <= root.keys() for root in tree.values()
        )
    )


def _walk_oncotree(
    node: dict[str, Any], ancestors: list[str], path: Path
) -> Iterator[tuple[dict[str, Any], list[str]]]:
    children = node.get("children") or {}
    if not isinstance(children, dict) or not isinstance(node.get("code"), str):
        where = " > ".join(ancestors) or "the root"
        raise KnowledgeSourceError(
            f"the OncoTree file {path} has a malformed node under {where}"
            " (every node needs a 'code' string and a 'children' object); download it again."
        )
    if ancestors or node.get("tissue"):
        yield node, ancestors
    names = [*ancestors, node.get("name") or node["code"]] if node.get("tissue") else ancestors
    for child in children.values():
        if not isinstance(child, dict):
            raise KnowledgeSourceError(
                f"the OncoTree file {path} has a child of {node['code']} that is not an object; "
                "download it again."
            )
        yield from _walk_oncotree(child, names, path)


def _oncotree_passage(node: dict[str, Any], ancestors: list[str], file: str) -> Passage:
    code, name = node["code"], node.get("name") or node["code"]
    sentences = [f"{name} ({code})."]
    if node.get("tissue"):
        kind = "tumour type of the" if ancestors else "top-level group for"
        sentences.append(f"OncoTree {kind} {node['tissue']} tissue.")
    if node.get("mainType") and node["mainType"] != name:
        sentences.append(f"Main type: {node['mainType']}.")
    if ancestors:
        sentences.append(f"Under {' > '.join(ancestors)}.")
    previous = [str(old) for old in node.get("history") or [] if old]
    if previous:
        sentences.append(f"Previously coded {', '.join(previous)}.")
    references = node.get("externalReferences") or {}
    xrefs = [
        f"{system}:{identifier}"
        for system, identifiers in sorted(references.items())
        if isinstance(identifiers, list)
        for identifier in identifiers
    ]
    return Passage(
        id=f"oncotree:{code}",
        title=f"{name} ({code})",
        text=" ".join(sentences),
        source=SourceRef(kind="oncotree", file=file, code=code, xrefs=xrefs),
    )


# --- Documents ----------------------------------------------------------------------------


def load_document(path: str | Path, *, name: str | None = None) -> list[Passage]:
    """Chunks of about ``CHUNK_WORDS`` words, cut at paragraph ends where possible.

    ``name`` is how the document is cited (default: its file name); a folder of sources
    passes the path inside the folder, so ``breast/README.md`` and ``lung/README.md`` differ.

    Each chunk's text is exactly ``document[char_start:char_end]``, so a citation can be
    highlighted in the source. Markdown headings start a new chunk and title the chunks
    beneath them (other chunks are titled by the file name without extension); PDF chunks
    never cross a page and their offsets are into that page's text.
    """
    path = _existing_file(path, "document")
    name = name or path.name
    suffix = path.suffix.lower()
    if suffix not in DOCUMENT_SUFFIXES:
        raise KnowledgeSourceError(
            f"{path} has an unsupported extension {path.suffix or '(none)'!r}; the knowledge "
            f"base reads {', '.join(sorted(SUPPORTED_SUFFIXES))}. Convert it to Markdown or "
            "plain text."
        )
    if suffix == ".pdf":
        sections = [(path.stem, text, page, 0, len(text)) for page, text in _pdf_pages(path)]
    else:
        text = _decoded_text(path)
        markdown = suffix in {".md", ".markdown"}
        sections = [
            (heading or path.stem, text, None, start, end)
            for heading, start, end in _headed_sections(text, markdown=markdown)
        ]
    passages = []
    for title, text, page, start, end in sections:
        for chunk_start, chunk_end in _chunks(text, start, end):
            passages.append(
                Passage(
                    id=f"doc:{name}#{len(passages)}",
                    title=title,
                    text=text[chunk_start:chunk_end],
                    source=SourceRef(
                        kind="document",
                        file=name,
                        page=page,
                        char_start=chunk_start,
                        char_end=chunk_end,
                    ),
                )
            )
    if not passages:
        raise KnowledgeSourceError(f"the document {path} has no text; remove it from the sources.")
    return passages


def _decoded_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise KnowledgeSourceError(
            f"{path} is not UTF-8 text (byte {error.start} cannot be decoded); if it is text, "
            "save it as UTF-8, and if it is a binary file, convert it to text or PDF first."
        ) from error
    if _CONTROL.search(text):
        raise KnowledgeSourceError(
            f"{path} holds binary control bytes, so it is not a text document; convert it to "
            "Markdown, plain text or PDF first."
        )
    return text


def _pdf_pages(path: Path) -> list[tuple[int, str]]:
    try:
        reader = pypdf.PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise KnowledgeSourceError(
                f"the PDF {path} is encrypted with a password; save an unencrypted copy and add "
                "that instead."
            )
        pages = [(number, page.extract_text() or "") for number, page in enumerate(reader.pages, 1)]
    except (PyPdfError, ValueError, KeyError, OSError) as error:
        raise KnowledgeSourceError(
            f"the PDF {path} cannot be read ({error}); check that it opens in a PDF viewer, or "
            "export its text to Markdown."
        ) from error
    if not any(text.strip() for _, text in pages):
        raise KnowledgeSourceError(
            f"the PDF {path} has no extractable text (a scan without OCR?); run OCR on it or "
            "export its text to Markdown."
        )
    return pages


def _headed_sections(text: str, *, markdown: bool) -> Iterator[tuple[str | None, int, int]]:
    """(heading, start, end) of each section with a body; a section includes its heading line."""
    if not markdown:
        yield None, 0, len(text)
        return
    heading, start, body, offset, in_code = None, 0, 0, 0, False
    for line in text.splitlines(keepends=True):
        if _CODE_FENCE.match(line):
            in_code = not in_code
        match = None if in_code else _MARKDOWN_HEADING.match(line.rstrip("\r\n"))
        if match:
            if text[body:offset].strip():
                yield heading, start, offset
            heading, start, body = match.group(2).strip(), offset, offset + len(line)
        offset += len(line)
    if text[body:].strip():
        yield heading, start, len(text)


def _chunks(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Character spans of overlapping word windows that prefer to end at a paragraph end."""
    words = [match.span() for match in _WORD.finditer(text, start, end)]
    # Word counts at which a paragraph ends (a blank line follows the word).
    paragraph_ends = [
        index + 1
        for index in range(len(words) - 1)
        if _BLANK_LINES.search(text, words[index][1], words[index + 1][0])
    ]
    first = 0
    while first < len(words):
        limit = first + CHUNK_WORDS
        if limit >= len(words):
            yield words[first][0], words[-1][1]
            return
        position = bisect.bisect_right(paragraph_ends, limit)
        stop = limit
        if position and paragraph_ends[position - 1] - first > OVERLAP_WORDS:
            stop = paragraph_ends[position - 1]
        yield words[first][0], words[stop - 1][1]
        first = stop - OVERLAP_WORDS


# --- Dispatch -----------------------------------------------------------------------------


def load_sources(paths: Iterable[str | Path]) -> list[Passage]:
    """Passages of every file given, folders searched recursively for supported files.

    ``.obo`` is an ontology, ``.json`` an OncoTree tree, anything else a document. When two
    sources yield the same passage id (a term in two ontologies, two releases of one file) the
    source given later wins and a warning says how many were replaced, so nothing is indexed
    twice. A document is replaced whole, so the chunks of two versions never mix.
    """
    passages: dict[str, Passage] = {}
    replaced: list[str] = []
    for file, name in _source_files(paths):
        incoming = _load_file(file, name)
        clashes = [passage.id for passage in incoming if passage.id in passages]
        stale = {passages[key].source.file for key in clashes if key.startswith("doc:")}
        passages = {
            key: passage
            for key, passage in passages.items()
            if not (key.startswith("doc:") and passage.source.file in stale)
        }
        passages.update((passage.id, passage) for passage in incoming)
        replaced += clashes
    if replaced:
        examples = ", ".join(replaced[:5])
        warnings.warn(
            f"{len(replaced)} passage id(s) appeared in more than one source ({examples}"
            f"{', …' if len(replaced) > 5 else ''}); the source given later was kept",
            stacklevel=2,
        )
    return list(passages.values())


def _source_files(paths: Iterable[str | Path]) -> Iterator[tuple[Path, str]]:
    """Each source file with the name it is cited by (its path inside a given folder)."""
    for path in map(Path, paths):
        if path.is_dir():
            yield from sorted(
                (file, file.relative_to(path).as_posix())
                for file in path.rglob("*")
                if file.is_file()
                and file.suffix.lower() in SUPPORTED_SUFFIXES
                and not any(part.startswith(".") for part in file.relative_to(path).parts)
            )
        else:
            yield path, path.name


def _load_file(path: Path, name: str) -> list[Passage]:
    suffix = path.suffix.lower()
    if suffix == ".obo":
        return load_obo(path)
    if suffix == ".json":
        return load_oncotree(path)
    return load_document(path, name=name)


def _existing_file(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise KnowledgeSourceError(
            f"the {what} {path} does not exist or is not a file; check the path."
        )
    return path
