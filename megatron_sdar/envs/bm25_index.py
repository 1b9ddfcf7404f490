"""A small BM25 index (bm25s) shared by the local WebShop search and Search-QA."""
from __future__ import annotations

import bm25s


class BM25Index:
    """BM25 (bm25s defaults: Lucene scoring, k1=1.5, b=0.75) over ``texts`` with English
    stopwords removed. :meth:`search` returns document indices with a positive score, best first."""

    def __init__(self, texts: list[str]) -> None:
        if not texts:
            raise ValueError("BM25Index needs at least one document")
        self.size = len(texts)
        self._bm25 = bm25s.BM25()
        self._bm25.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def search(self, query: str, k: int) -> list[int]:
        # Query as strings: bm25s maps them onto the index vocabulary and ignores unknown words.
        tokens = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)
        if not tokens[0]:
            return []
        docs, scores = self._bm25.retrieve(tokens, k=min(k, self.size), show_progress=False)
        return [int(d) for d, s in zip(docs[0], scores[0]) if s > 0]
