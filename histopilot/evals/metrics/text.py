"""Text metrics: answer matching (exact match, token F1) and caption metrics (BLEU, ROUGE-L,
CIDEr, METEOR).

Every metric here sees text through one tokeniser, :func:`tokens`, so that they agree on what
a word is. The COCO caption toolkit (``pycocoevalcap``) normally tokenises with Stanford's PTB
tokenizer, which needs Java; we tokenise in Python instead and feed the toolkit's scorers
space-joined tokens, so BLEU, ROUGE-L and CIDEr run without Java and only METEOR needs it.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections import Counter
from collections.abc import Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pydantic import BaseModel

_WORD = re.compile(r"[^\W_]+")
_ARTICLES = frozenset({"a", "an", "the"})
#: METEOR loads its paraphrase tables first (about ten seconds), then scores quickly; past
#: this many seconds plus a little per pair, the Java process is taken to be stuck and killed.
METEOR_START_S = 60.0
METEOR_PER_PAIR_S = 0.05
NO_JAVA_NOTE = "METEOR skipped: no Java runtime (apt install default-jre-headless)"


def tokens(text: str) -> list[str]:
    """Lowercase word tokens (runs of letters and digits); punctuation and spacing dropped.

    "HER2-positive, 3+" gives ``["her2", "positive", "3"]``.
    """
    return _WORD.findall(text.lower())


def normalise_answer(text: str) -> str:
    """An answer reduced for comparison, SQuAD-style (Rajpurkar et al., 2016): lowercase,
    punctuation and the articles a/an/the dropped, words joined by single spaces.

    Unlike SQuAD's script, which deletes punctuation characters (so "tumour-free" becomes
    "tumourfree"), punctuation separates words here, as in :func:`tokens`.
    """
    return " ".join(word for word in tokens(text) if word not in _ARTICLES)


def exact_match(prediction: str, answer: str) -> bool:
    """Whether two answers are the same once normalised (:func:`normalise_answer`)."""
    return normalise_answer(prediction) == normalise_answer(answer)


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD's token-overlap F1 of two normalised answers, counting repeated words.

    Two empty answers agree (1.0); an empty answer against a non-empty one scores 0.0.
    """
    predicted, expected = normalise_answer(prediction).split(), normalise_answer(answer).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def java_available() -> bool:
    """Whether a ``java`` executable is on the PATH (METEOR runs as a Java program)."""
    return shutil.which("java") is not None


class TextScores(BaseModel):
    """Corpus-level caption scores of candidates against their references.

    BLEU-n is the geometric mean of clipped 1..n-gram precisions with a brevity penalty over
    the whole corpus (Papineni et al., 2002); ROUGE-L is the mean per pair of the LCS-based
    F-measure with β = 1.2 (Lin, 2004; COCO's setting); CIDEr is COCO's implementation (with
    CIDEr-D's clipping and length penalty, scaled by 10; Vedantam et al., 2015); METEOR is
    version 1.5 (Denkowski & Lavie, 2014). All lie in [0, 1] except CIDEr, in [0, 10].
    """

    bleu_1: float
    bleu_2: float
    bleu_3: float
    bleu_4: float
    rouge_l: float
    cider: float
    meteor: float | None
    meteor_note: str = ""
    count: int


def text_scores(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    meteor: bool = True,
) -> TextScores:
    """Score each candidate against its one or more references, over the whole set.

    CIDEr weights n-grams by their inverse document frequency over the references of the
    set, so it only means something over many items: a single pair scores 0, since every
    n-gram then appears in every "document". METEOR is computed when ``meteor`` is true and
    Java is present; otherwise, or when the Java process fails, it is None and
    ``meteor_note`` says why.
    """
    if len(candidates) != len(references):
        raise ValueError(
            f"got {len(candidates)} candidates but {len(references)} reference lists; "
            "give one list of references per candidate."
        )
    if not candidates:
        raise ValueError("no candidates to score; give at least one candidate.")
    if not all(references):
        empty = next(index for index, refs in enumerate(references) if not refs)
        raise ValueError(f"candidate {empty} has no references; give at least one per candidate.")
    res = {index: [" ".join(tokens(text))] for index, text in enumerate(candidates)}
    gts = {
        index: [" ".join(tokens(text)) for text in refs] for index, refs in enumerate(references)
    }
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    meteor_score, meteor_note = (
        _meteor(gts, res) if meteor else (None, "METEOR skipped: not requested")
    )
    return TextScores(
        bleu_1=bleu[0],
        bleu_2=bleu[1],
        bleu_3=bleu[2],
        bleu_4=bleu[3],
        rouge_l=float(rouge),
        cider=_cider(gts, res),
        meteor=meteor_score,
        meteor_note=meteor_note,
        count=len(candidates),
    )


def _cider(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    # The scorer takes the largest document frequency of any reference n-gram, which fails
    # when no reference has a word; nothing can then match, so the score is 0.
    if not any(text for refs in gts.values() for text in refs):
        return 0.0
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float | None, str]:
    """METEOR over the set, or None and the reason.

    The Java process reads one line per request, so a newline or its field separator "|||"
    inside a text would leave it waiting forever; :func:`tokens` has already removed both.
    A watchdog kills the process if it still runs past its time, which turns a hang into a
    read error reported in the note.
    """
    if not java_available():
        return None, NO_JAVA_NOTE
    try:
        scorer = Meteor()
    except OSError as error:
        return None, f"METEOR skipped: Java did not start ({error})"
    process = scorer.meteor_p
    watchdog = threading.Timer(METEOR_START_S + METEOR_PER_PAIR_S * len(res), process.kill)
    watchdog.start()
    try:
        score, _ = scorer.compute_score(gts, res)
    except (OSError, ValueError) as error:
        return None, f"METEOR failed (Java exited, or ran out of time and was stopped): {error}"
    else:
        return float(score), ""
    finally:
        watchdog.cancel()
        # The scorer's lock stays held when scoring fails, and its finaliser takes that lock:
        # release it, so that collecting the scorer cannot block, and end Java now.
        if scorer.lock.locked():
            scorer.lock.release()
        process.kill()
        process.communicate()  # reaps it and closes its pipes
