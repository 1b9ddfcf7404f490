"""Search-QA in the Search-R1 style: the agent searches a corpus, then answers.

Actions (the first tag pair in the response counts, as in Search-R1):

- ``<search>query</search>``: the retriever's top ``topk`` passages come back as
  ``<information>Doc 1(Title: t) text\\nDoc 2(Title: t) text\\n</information>``;
- ``<answer>text</answer>``: ends the episode. Reward: exact match (default) or token F1
  against the gold answers after SQuAD normalization (see
  :mod:`megatron_sdar.envs.text_match`); ``info`` carries both ``em`` and ``f1``;
  ``won`` is ``em == 1``.

Anything else is an invalid action: the observation explains the format, the state is
unchanged and ``info["invalid_action"]`` is set.

Retrievers: :class:`BM25Retriever` (bm25s over a JSONL corpus of ``{"id", "title",
"text"}``; the shipped corpus by default) and :class:`HTTPRetriever` for a Search-R1
retrieval server (``POST {url}/retrieve`` with ``{"queries": [...], "topk": k,
"return_scores": true}``, answered by ``{"result": [[{"document": {"id", "contents"},
"score": s}, ...]]}``, ``contents`` = ``'"Title"\\ntext'``).

Questions: JSONL of ``{"id", "question", "answers": [...], "task_type", "data_source"?,
"gold_passages"?}``; ``task_type`` is the skill category (the reference Search skill set
uses ``direct_retrieval``, ``entity_attribute_lookup``, ``multi_hop_reasoning``,
``compare``).

Splits (:mod:`megatron_sdar.envs.splits`), Search-R1's layout: ``train_questions=`` and
``test_questions=`` are a file or a list of files (one per dataset); the shipped sample is
``data/search/train.jsonl`` and ``data/search/test.jsonl``. ``reset(seed, split="test")`` draws a
test question; ``validation`` draws from the fixed tenth of the train questions that
:func:`~megatron_sdar.envs.splits.search_train_split` assigns by a hash of the question id, and
``train`` from the other train questions.
"""
from __future__ import annotations

import json
import random
import re
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from megatron_sdar.envs.base import EnvError, EnvOptionError, TextEnv, check_http_url
from megatron_sdar.envs.bm25_index import BM25Index
from megatron_sdar.envs.splits import SPLITS, as_paths, search_question_key, search_train_split
from megatron_sdar.envs.text_match import exact_match, f1_score

DATA_DIR = Path(__file__).parent / "data" / "search"
DEFAULT_CORPUS = DATA_DIR / "corpus.jsonl"
DEFAULT_TRAIN_QUESTIONS = DATA_DIR / "train.jsonl"
DEFAULT_TEST_QUESTIONS = DATA_DIR / "test.jsonl"
ACTION_TAG = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL | re.IGNORECASE)
INVALID_SEARCH_ACTION = ("Invalid action. Search with <search>query</search> or give the final answer with "
                         "<answer>answer</answer>.")


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


class Retriever(Protocol):
    def retrieve(self, query: str, topk: int) -> list[Passage]: ...


def _read_jsonl(path: Path, what: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EnvError(f"{path}:{line_no}: not valid JSON ({exc})") from None
        missing = [k for k in required if k not in row]
        if missing:
            raise EnvError(f"{path}:{line_no}: {what} entry misses {missing}")
        rows.append(row)
    if not rows:
        raise EnvError(f"{what} file {path} is empty")
    return rows


class BM25Retriever:
    """BM25 (bm25s, Lucene variant, English stopwords) over title + text of each passage."""

    def __init__(self, corpus_path: str | Path | None = None) -> None:
        path = Path(corpus_path) if corpus_path is not None else DEFAULT_CORPUS
        rows = _read_jsonl(path, "corpus", ("id", "text"))
        self.passages = [Passage(str(r["id"]), str(r.get("title", "")), str(r["text"])) for r in rows]
        self._index = BM25Index([f"{p.title} {p.text}" for p in self.passages])

    def retrieve(self, query: str, topk: int = 3) -> list[Passage]:
        return [self.passages[i] for i in self._index.search(query, topk)]


class HTTPRetriever:
    """Client of a Search-R1 style retrieval server (dense or sparse, any backend)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def retrieve(self, query: str, topk: int = 3) -> list[Passage]:
        body = json.dumps({"queries": [query], "topk": topk, "return_scores": True}).encode()
        request = urllib.request.Request(f"{self.url}/retrieve", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read().decode("utf-8"))
        except (urllib.error.URLError, json.JSONDecodeError) as exc:
            raise EnvError(f"retrieval server {self.url}/retrieve failed: {exc}") from None
        try:
            hits = payload["result"][0]
        except (KeyError, IndexError, TypeError):
            raise EnvError(f"retrieval server {self.url}: expected {{'result': [[...]]}}, got {str(payload)[:200]}") from None
        passages = []
        for hit in hits:
            doc = hit.get("document", hit) if isinstance(hit, dict) else {}
            if "contents" in doc:
                title, _, text = str(doc["contents"]).partition("\n")
                title = title.strip().strip('"')
            else:
                title, text = str(doc.get("title", "")), str(doc.get("text", ""))
            passages.append(Passage(str(doc.get("id", "")), title, text.strip()))
        return passages


def format_passages(passages: list[Passage]) -> str:
    lines = "".join(f"Doc {i}(Title: {p.title}) {p.text}\n" for i, p in enumerate(passages, 1))
    return f"<information>{lines}</information>" if passages else "<information>No results.</information>"


def parse_search_action(action: str) -> tuple[str, str] | None:
    """First ``<search>``/``<answer>`` tag pair -> (kind, content); None if there is none."""
    match = ACTION_TAG.search(action)
    if match is None:
        return None
    return match.group(1).lower(), match.group(2).strip()


def serve_retriever(retriever: Retriever, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Serve ``retriever`` with the Search-R1 ``/retrieve`` API in a daemon thread (to share
    one index between trainers, or for tests). Returns (server, base_url)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server naming)
            if self.path.rstrip("/") != "/retrieve":
                self.send_error(404)
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                queries, topk = request["queries"], int(request.get("topk") or 3)
            except (ValueError, KeyError, TypeError) as exc:
                self.send_error(400, f"bad request: {exc}")
                return
            result = [[{"document": {"id": p.id, "contents": f'"{p.title}"\n{p.text}'}, "score": None}
                       for p in retriever.retrieve(q, topk)] for q in queries]
            payload = json.dumps({"result": result}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="retriever-http", daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}"


def load_question_splits(train_questions: str | Path | list | None = None,
                         test_questions: str | Path | list | None = None) -> dict[str, list[dict[str, Any]]]:
    """The questions of each split (train / validation / test) from the train and test files (the
    shipped sample by default); ``key`` (:func:`~megatron_sdar.envs.splits.search_question_key`) is
    set on every row. A question in both a train and a test file is refused."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for part, value, default in (("train", train_questions, DEFAULT_TRAIN_QUESTIONS),
                                 ("test", test_questions, DEFAULT_TEST_QUESTIONS)):
        rows[part] = []
        for path in as_paths(value, default):
            for row in _read_jsonl(path, "questions", ("id", "question", "answers")):
                if isinstance(row["answers"], str):
                    row["answers"] = [row["answers"]]
                row["key"] = search_question_key(row)
                rows[part].append(row)
    both = sorted({r["key"] for r in rows["train"]} & {r["key"] for r in rows["test"]})
    if both:
        raise EnvError(f"search: {len(both)} question(s) are in both the train and the test files, e.g. {both[0]!r}")
    splits: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    splits["test"] = rows["test"]
    for row in rows["train"]:
        splits[search_train_split(row["key"])].append(row)
    return splits


class SearchQAEnv(TextEnv):
    """``make("search")``: shipped corpus + train/test questions, BM25. ``retriever_url=`` switches to
    a Search-R1 retrieval server; ``corpus_path=``, ``train_questions=``/``test_questions=`` (a file
    or a list, one per dataset) point at real data. ``reset(seed, split=...)`` draws a question of
    the split with ``Random(seed)`` (``options={"question_index": i}`` picks the split's question
    ``i``); :attr:`splits` holds them, :attr:`questions` every question."""

    name = "search"

    def __init__(self, train_questions: str | Path | list | None = None,
                 test_questions: str | Path | list | None = None, corpus_path: str | Path | None = None,
                 retriever_url: str | None = None, topk: int = 3, reward: str = "em", max_turns: int = 4,
                 seed: int | None = None) -> None:
        super().__init__(max_turns=max_turns, seed=seed)
        try:
            self.check_options(retriever_url=retriever_url, topk=topk, reward=reward)
        except EnvOptionError as exc:
            raise ValueError(f"{exc.option} {exc.problem}") from None
        self.reward_kind = reward
        self.topk = topk
        self.splits = load_question_splits(train_questions, test_questions)
        self.questions = [row for split in SPLITS for row in self.splits[split]]
        self.retriever: Retriever = HTTPRetriever(retriever_url) if retriever_url else BM25Retriever(corpus_path)
        self.question: dict[str, Any] = {}

    @classmethod
    def check_options(cls, retriever_url: str | None = None, topk: int = 3, reward: str = "em", **_: Any) -> None:
        """The reward kind, ``topk`` and the retrieval server's URL format (the question and corpus files
        are :func:`~megatron_sdar.envs.splits.data_problem`'s)."""
        if reward not in ("em", "f1"):
            raise EnvOptionError("reward", f"must be 'em' or 'f1', got {reward!r}")
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise EnvOptionError("topk", f"must be a whole number >= 1, got {topk!r}")
        if retriever_url is not None:
            check_http_url("retriever_url", retriever_url)

    def _info(self, invalid: bool, **extra: Any) -> dict[str, Any]:
        info = {"won": False, "task_type": str(self.question.get("task_type", "search")),
                "task": self.question["question"], "invalid_action": invalid}
        info.update(extra)
        return info

    def _reset(self, rng: random.Random, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        pool = self.splits[self.split]
        if not pool:
            why = " (the train questions whose id hashes below 0.1: none)" if self.split == "validation" else ""
            raise EnvError(f"search: the {self.split} split has no questions{why}")
        index = options.get("question_index", rng.randrange(len(pool)))
        self.question = pool[index]
        return self.question["question"], self._info(False, question_id=self.question["key"])

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        parsed = parse_search_action(action)
        if parsed is None or not parsed[1]:
            return INVALID_SEARCH_ACTION, 0.0, False, self._info(True)
        kind, content = parsed
        if kind == "search":
            passages = self.retriever.retrieve(content, self.topk)
            return format_passages(passages), 0.0, False, self._info(False, retrieved_ids=[p.id for p in passages])
        em = exact_match(content, self.question["answers"])
        f1 = f1_score(content, self.question["answers"])
        info = self._info(False, em=em, f1=f1, answer=content)
        info["won"] = em == 1.0
        return f"Your answer: {content}", (em if self.reward_kind == "em" else f1), True, info
