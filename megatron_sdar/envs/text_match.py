"""Small text utilities shared by the WebShop and Search-QA environments."""
from __future__ import annotations

import re
import string
from collections import Counter
from difflib import SequenceMatcher

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
STOPWORDS = frozenset(
    "a an the and or of for with in on at to from by is are was were be been it its this that these those "
    "as into than then so such no not only own same too very can will just should now i me my we our you your "
    "he him his she her they them their what which who whom when where why how all any both each few more most "
    "other some do does did has have had having up down out over under again further once here there about".split()
)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def token_set_ratio(a: str, b: str) -> float:
    """Fuzzy similarity in [0, 100] that ignores word order and repeated words.

    With ``A``/``B`` the word sets, ``I = sorted(A & B)`` joined by spaces, ``SA = I + sorted(A - B)``
    and ``SB = I + sorted(B - A)``: ``max(r(I, SA), r(I, SB), r(SA, SB))`` where ``r`` is 100 x
    difflib's ratio (2 * matches / total length). A word set contained in the other scores
    100. (The same construction as the ``token_set_ratio`` WebShop takes from thefuzz; the
    per-pair ratio is difflib's, not Levenshtein's, so borderline scores can differ.)
    """
    set_a, set_b = set(words(a)), set(words(b))
    if not set_a or not set_b:
        return 0.0
    inter = " ".join(sorted(set_a & set_b))
    only_a = " ".join(sorted(set_a - set_b))
    only_b = " ".join(sorted(set_b - set_a))
    full_a = f"{inter} {only_a}".strip()
    full_b = f"{inter} {only_b}".strip()

    def ratio(x: str, y: str) -> float:
        if not x and not y:
            return 100.0
        return 100.0 * SequenceMatcher(None, x, y).ratio()

    pairs = [(full_a, full_b)]
    if inter:
        pairs += [(inter, full_a), (inter, full_b)]
    return max(ratio(x, y) for x, y in pairs)


# ---------------------------------------------------------------- QA answer matching
def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower-case, drop punctuation, drop the articles a/an/the,
    collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: list[str] | str) -> float:
    """1.0 if ``normalize_answer(prediction)`` equals the normalized form of any gold answer."""
    golds = [golds] if isinstance(golds, str) else golds
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def f1_score(prediction: str, golds: list[str] | str) -> float:
    """Token F1 (max over gold answers) on normalized answers:
    ``P = common / len(pred_tokens)``, ``R = common / len(gold_tokens)``, ``F1 = 2PR / (P + R)``,
    where ``common`` counts shared tokens with multiplicity; 0 when nothing is shared."""
    golds = [golds] if isinstance(golds, str) else golds
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        gold_tokens = normalize_answer(gold).split()
        if not pred_tokens or not gold_tokens:
            best = max(best, float(pred_tokens == gold_tokens))
            continue
        common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred_tokens), common / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best
