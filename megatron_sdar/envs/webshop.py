"""WebShop: a self-contained local shop and a client for a running WebShop server.

Both speak WebShop's text observation mode ("simple": the page's visible texts joined by
``" [SEP] "``) and its two actions, ``search[query]`` (only on a page with a search bar)
and ``click[name]`` (a button, a product link or an option value shown on the page,
lower-case). The episode ends with ``click[buy now]``; the reward is computed by
:func:`webshop_reward` and the episode counts as won when the reward is 1.0.

Local shop (:class:`LocalWebShopEnv`): a product catalog JSON (the shipped one by default,
``megatron_sdar/envs/data/webshop/catalog.json``) searched with BM25 (bm25s). Its pages are
produced by :class:`LocalShop.handle` under WebShop's URL scheme (``/<session>``,
``/search_results/...``, ``/item_page/...``, ``/item_sub_page/...``, ``/done/...``), so the
same router also backs the HTML server in :mod:`megatron_sdar.envs.webshop_http`.

Catalog format::

    {"products": [{"asin": "B0SDAR0001", "name": "crew neck t-shirt", "Title": "...",
                   "query": "men's t-shirts", "category": "fashion",
                   "product_category": "Clothing › Men › Shirts", "Price": 14.99,
                   "Attributes": ["machine wash", ...], "BulletPoints": [...],
                   "Description": "...", "options": {"size": ["small", ...], ...},
                   "task_type": "apparel"}, ...],
     "goals": [{"asin": "B0SDAR0001", "instruction_text": "...", "attributes": [...],
                "goal_options": {"size": "medium"}, "price_upper": 20.0}, ...]}

``task_type`` names the skill category (the reference WebShop skill set's ``apparel``,
``footwear``, ...). A goal inherits ``name``, ``query``, ``category`` and
``product_category`` from its target product.

Splits (:func:`megatron_sdar.envs.splits.webshop_goal_ranges`): ``reset(seed, split=...)`` draws a
goal index from the split's range of the goal list, WebShop's own split (test: the first 500
goals, validation: the next 1,000, train: the rest; a list of at most 1,500 goals in the same
proportions, at least one goal each).
"""
from __future__ import annotations

import abc
import ast
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from megatron_sdar.envs.base import EnvError, TextEnv
from megatron_sdar.envs.bm25_index import BM25Index
from megatron_sdar.envs.splits import webshop_goal_ranges
from megatron_sdar.envs.text_match import STOPWORDS, token_set_ratio, words

DEFAULT_CATALOG = Path(__file__).parent / "data" / "webshop" / "catalog.json"
RESULTS_PER_PAGE = 10
MAX_SEARCH_RESULTS = 50
EXACT_MATCH_OPTIONS = ("size",)  # WebShop matches these option names exactly, others fuzzily
FUZZY_THRESHOLD = 85.0
ACTION_PATTERN = re.compile(r"^\s*(search|click)\s*\[(.*)\]\s*$", re.IGNORECASE | re.DOTALL)
CATEGORY_SEPARATOR = "›"


# =============================================================================== reward
@dataclass
class RewardBreakdown:
    total: float
    r_type: float
    attribute_matches: int
    option_matches: int
    price_ok: bool
    title_score: float
    query_match: bool
    category_match: bool


def _type_words(name: str) -> set[str]:
    # WebShop keeps the nouns of the product name (spaCy POS tags). Without a tagger we keep
    # content words: alphabetic, two letters or more, not a stopword.
    return {w for w in words(name) if w.isalpha() and len(w) > 1 and w not in STOPWORDS}


def _product_text(product: dict[str, Any]) -> str:
    return " ".join([product.get("Title", ""), " ".join(product.get("BulletPoints", [])),
                     product.get("Description", "")]).lower()


def webshop_reward(product: dict[str, Any], goal: dict[str, Any], price: float,
                   options: dict[str, str]) -> RewardBreakdown:
    """WebShop's purchase reward.

    ``total = r_type * (n_att + n_opt + r_price) / (|goal attributes| + |goal options| + 1)``

    - ``n_att``: goal attributes matched by a product attribute with token-set similarity
      > 85, or contained in the product's title, bullet points or description;
    - ``n_opt``: chosen options that match a goal option value (exactly for ``size``,
      similarity > 85 otherwise), or that appear in the title/bullets/description;
    - ``r_price``: 1 if ``price <= goal["price_upper"]``, else 0;
    - ``r_type``: 1.0, lowered to 0.5 when neither the search query, nor >= 2 levels of the
      ``›``-separated product category, nor > 20% of the goal name's words (title score)
      match; to 0.1 when the title score is below 0.1; to 0.0 when it is 0. The title
      score is ``|W(product name) & W(goal name)| / |W(goal name)|`` (0.2 when the goal
      name has no content words), ``W`` = content words (see :func:`_type_words`).
    """
    query_match = product.get("query") == goal.get("query")
    cats_p = {c.strip() for c in product.get("product_category", "").split(CATEGORY_SEPARATOR) if c.strip()}
    cats_g = {c.strip() for c in goal.get("product_category", "").split(CATEGORY_SEPARATOR) if c.strip()}
    category_match = len(cats_p & cats_g) >= 2
    goal_words = _type_words(goal.get("name", ""))
    title_score = 0.2 if not goal_words else len(_type_words(product.get("name", "")) & goal_words) / len(goal_words)
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0

    text = _product_text(product)
    n_att = 0
    for g_attr in goal.get("attributes", []):
        if any(token_set_ratio(p_attr, g_attr) > FUZZY_THRESHOLD for p_attr in product.get("Attributes", [])) \
                or g_attr.lower() in text:
            n_att += 1

    goal_values = [str(v).lower() for v in goal.get("goal_options", {}).values()]
    n_opt = 0
    for name, value in options.items():
        value = str(value).lower()
        if name.lower() in EXACT_MATCH_OPTIONS:
            matched = value in goal_values
        else:
            matched = any(token_set_ratio(g, value) > FUZZY_THRESHOLD for g in goal_values)
        if matched or value in text:
            n_opt += 1

    price_ok = float(price) <= float(goal.get("price_upper", float("inf")))
    denominator = len(goal.get("attributes", [])) + len(goal.get("goal_options", {})) + 1
    total = r_type * (n_att + n_opt + int(price_ok)) / denominator
    return RewardBreakdown(total, r_type, n_att, n_opt, price_ok, title_score, query_match, category_match)


# ================================================================================ pages
@dataclass
class PageElement:
    """One visible piece of a page. ``kind``: text | instruction | button | link | radio |
    search | reward. ``target`` is the URL a click leads to; ``group`` the option name."""

    kind: str
    text: str
    target: str = ""
    group: str = ""


@dataclass
class Page:
    kind: str  # search | results | item | item_sub | done
    elements: list[PageElement]
    reward: float | None = None
    redirect: str | None = None
    observation_override: str | None = None  # set when the text comes from parsed HTML

    @property
    def observation(self) -> str:
        if self.observation_override is not None:
            return self.observation_override
        texts: list[str] = []
        for el in self.elements:
            texts.extend(["Instruction:", el.text] if el.kind == "instruction" else [el.text])
        return " [SEP] ".join(t for t in texts if t)

    @property
    def clickables(self) -> dict[str, str]:
        return {el.text.lower(): el.target for el in self.elements if el.kind in ("button", "link", "radio")}

    @property
    def has_search_bar(self) -> bool:
        return any(el.kind == "search" for el in self.elements)

    @property
    def instruction(self) -> str:
        return next((el.text for el in self.elements if el.kind == "instruction"), "")


def parse_webshop_action(action: str) -> tuple[str, str] | None:
    """``"search[red shoes]"`` -> ``("search", "red shoes")``; None when unparseable."""
    match = ACTION_PATTERN.match(action)
    if match is None or not match.group(2).strip():
        return None
    return match.group(1).lower(), match.group(2).strip()


def webshop_admissible(page: Page) -> list[str]:
    actions = ["search[<query>]"] if page.has_search_bar else []
    return actions + [f"click[{name}]" for name in page.clickables]


@dataclass
class _Session:
    goal: dict[str, Any]
    purchased: bool = False


def _kw_part(keywords: list[str]) -> str:
    return quote(str(keywords), safe="")


def _opt_part(options: dict[str, str]) -> str:
    return quote(json.dumps(options, sort_keys=True), safe="")


class LocalShop:
    """Catalog, BM25 product search and the page router (WebShop's URL scheme)."""

    def __init__(self, catalog_path: str | Path | None = None, seed: int = 0) -> None:
        path = Path(catalog_path) if catalog_path is not None else DEFAULT_CATALOG
        if not path.is_file():
            raise FileNotFoundError(f"webshop catalog {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise EnvError(f"webshop catalog {path}: not valid JSON ({exc})") from None
        products = data.get("products") if isinstance(data, dict) else None
        goals = data.get("goals") if isinstance(data, dict) else None
        if not products or not goals:
            raise EnvError(f"webshop catalog {path}: needs non-empty 'products' and 'goals' lists")
        self.products: dict[str, dict[str, Any]] = {}
        for i, product in enumerate(products):
            missing = [k for k in ("asin", "name", "Title", "Price") if k not in product]
            if missing:
                raise EnvError(f"webshop catalog {path}: product #{i} misses {missing}")
            product = dict(product)
            product["asin"] = product["asin"].upper()
            product["options"] = {k.lower(): [str(v).lower() for v in vals]
                                  for k, vals in product.get("options", {}).items()}
            self.products[product["asin"]] = product
        self.goals: list[dict[str, Any]] = []
        for i, goal in enumerate(goals):
            asin = str(goal.get("asin", "")).upper()
            if asin not in self.products:
                raise EnvError(f"webshop catalog {path}: goal #{i} targets unknown asin {goal.get('asin')!r}")
            target = self.products[asin]
            full = {k: target.get(k, "") for k in ("name", "query", "category", "product_category")}
            full.update(goal)
            full["asin"] = asin
            full.setdefault("task_type", target.get("task_type", "other"))
            full["goal_options"] = {k.lower(): str(v).lower() for k, v in goal.get("goal_options", {}).items()}
            self.goals.append(full)
        self._rng = random.Random(seed)
        self.sessions: dict[str, _Session] = {}
        self._asins = list(self.products)
        corpus = [" ".join([p["Title"], p.get("query", ""), p.get("category", ""), " ".join(p.get("Attributes", [])),
                            " ".join(p.get("BulletPoints", []))]) for p in self.products.values()]
        self._index = BM25Index(corpus)

    # ---------------------------------------------------------------- search
    def search(self, keywords: list[str]) -> list[str]:
        return [self._asins[i] for i in self._index.search(" ".join(keywords), MAX_SEARCH_RESULTS)]

    # ---------------------------------------------------------------- sessions
    def start_session(self, session_id: str, goal_index: int | None = None) -> _Session:
        if goal_index is None:
            match = re.fullmatch(r".*fixed_(\d+)", session_id)
            goal_index = int(match.group(1)) if match else self._rng.randrange(len(self.goals))
        if not 0 <= goal_index < len(self.goals):
            raise EnvError(f"goal index {goal_index} out of range (catalog has {len(self.goals)} goals)")
        session = _Session(goal=self.goals[goal_index])
        self.sessions[session_id] = session
        return session

    # ---------------------------------------------------------------- router
    def handle(self, path: str, form: dict[str, str] | None = None) -> Page:
        """Serve one request. Raises KeyError (-> HTTP 404) for an unknown route/session/asin."""
        parts = [unquote(p) for p in path.strip("/").split("/")]
        route = parts[0] if len(parts) > 1 else "index"
        if route == "index":
            sid = parts[0]
            session = self.sessions.get(sid) or self.start_session(sid)
            if form and form.get("search_query", "").strip():
                keywords = form["search_query"].lower().split()
                return Page("redirect", [], redirect=f"/search_results/{sid}/{_kw_part(keywords)}/1")
            return Page("search", [PageElement("text", "WebShop"),
                                   PageElement("instruction", session.goal["instruction_text"]),
                                   PageElement("search", "Search", target=f"/{sid}")])
        sid = parts[1]
        session = self.sessions[sid]
        instruction = PageElement("instruction", session.goal["instruction_text"])
        back = PageElement("button", "Back to Search", target=f"/{sid}")
        if route == "search_results" and len(parts) == 4:
            keywords, page_no = _parse_keywords(parts[2]), int(parts[3])
            hits = self.search(keywords)
            shown = hits[(page_no - 1) * RESULTS_PER_PAGE: page_no * RESULTS_PER_PAGE]
            elements = [instruction, back, PageElement("text", f"Page {page_no} (Total results: {len(hits)})")]
            if page_no > 1:
                elements.append(PageElement("button", "< Prev",
                                            target=f"/search_results/{sid}/{_kw_part(keywords)}/{page_no - 1}"))
            if page_no * RESULTS_PER_PAGE < len(hits):
                elements.append(PageElement("button", "Next >",
                                            target=f"/search_results/{sid}/{_kw_part(keywords)}/{page_no + 1}"))
            for asin in shown:
                product = self.products[asin]
                elements += [PageElement("link", asin, target=_item_url(sid, asin, keywords, page_no, {})),
                             PageElement("text", product["Title"]), PageElement("text", f"${product['Price']:.2f}")]
            return Page("results", elements)
        if route in ("item_page", "item_sub_page"):
            asin, keywords, page_no = parts[2].upper(), _parse_keywords(parts[3]), int(parts[4])
            options = json.loads(parts[-1])
            product = self.products[asin]
            if route == "item_sub_page":
                sub = parts[5]
                body = {"Description": product.get("Description", ""),
                        "Features": " ".join(product.get("BulletPoints", [])),
                        "Reviews": "No reviews yet."}.get(sub)
                if body is None:
                    raise KeyError(sub)
                prev = PageElement("button", "< Prev", target=_item_url(sid, asin, keywords, page_no, options))
                return Page("item_sub", [instruction, back, prev, PageElement("text", body)])
            elements = [instruction, back,
                        PageElement("button", "< Prev", target=f"/search_results/{sid}/{_kw_part(keywords)}/{page_no}")]
            for name, values in product.get("options", {}).items():
                elements.append(PageElement("text", name))
                for value in values:
                    chosen = dict(options, **{name: value})
                    elements.append(PageElement("radio", value, group=name,
                                                target=_item_url(sid, asin, keywords, page_no, chosen)))
            elements += [PageElement("text", product["Title"]), PageElement("text", f"Price: ${product['Price']:.2f}"),
                         PageElement("text", "Rating: N.A.")]
            for sub in ("Description", "Features", "Reviews"):
                elements.append(PageElement(
                    "button", sub, target=f"/item_sub_page/{sid}/{asin}/{_kw_part(keywords)}/{page_no}/{sub}/"
                                          f"{_opt_part(options)}"))
            elements.append(PageElement("button", "Buy Now", target=f"/done/{sid}/{asin}/{_opt_part(options)}"))
            return Page("item", elements)
        if route == "done" and len(parts) == 4:
            asin, options = parts[2].upper(), json.loads(parts[3])
            product = self.products[asin]
            breakdown = webshop_reward(product, session.goal, product["Price"], options)
            session.purchased = True
            reward = round(breakdown.total, 6)
            return Page("done", [PageElement("text", "Thank you for shopping with us!"),
                                 PageElement("text", "Your score (min 0.0, max 1.0)"),
                                 PageElement("reward", f"{reward}")], reward=reward)
        raise KeyError(path)


def _parse_keywords(text: str) -> list[str]:
    if text.startswith("["):
        value = ast.literal_eval(text)  # WebShop puts str(list) in the URL; literal_eval only parses literals
        if not isinstance(value, list):
            raise KeyError(text)
        return [str(v) for v in value]
    return text.split()


def _item_url(sid: str, asin: str, keywords: list[str], page_no: int, options: dict[str, str]) -> str:
    return f"/item_page/{sid}/{asin}/{_kw_part(keywords)}/{page_no}/{_opt_part(options)}"


# ================================================================================= envs
class _WebShopEnvBase(TextEnv):
    """Shared step logic: parse the action, follow a click target or submit a search."""

    name = "webshop"
    page: Page

    @abc.abstractmethod
    def _open(self, path: str, form: dict[str, str] | None = None) -> Page:
        """Fetch a shop page: the local shop (LocalWebShopEnv) or a WebShop server over HTTP
        (WebShopHTTPEnv)."""

    def _task_type(self) -> str:
        return "webshop"

    def _info(self, invalid: bool) -> dict[str, Any]:
        won = self.page.reward is not None and self.page.reward >= 1.0 - 1e-9
        return {"admissible_actions": webshop_admissible(self.page), "won": won, "task_type": self._task_type(),
                "task": self.instruction, "invalid_action": invalid, "page": self.page.kind}

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        parsed = parse_webshop_action(action)
        target: tuple[str, dict[str, str] | None] | None = None
        if parsed is not None:
            verb, arg = parsed
            if verb == "search" and self.page.has_search_bar:
                target = (self.search_target, {"search_query": arg})
            elif verb == "click" and arg.lower() in self.page.clickables:
                target = (self.page.clickables[arg.lower()], None)
        if target is None:
            # WebShop leaves the page as it is on an invalid action.
            return self.page.observation, 0.0, False, self._info(True)
        self.page = self._open(*target)
        done = self.page.reward is not None
        return self.page.observation, float(self.page.reward or 0.0), done, self._info(False)

    @property
    def search_target(self) -> str:
        return next(el.target for el in self.page.elements if el.kind == "search")


class LocalWebShopEnv(_WebShopEnvBase):
    """WebShop over a local catalog. ``reset(seed, split=...)`` draws the goal among the split's
    goal indices (:attr:`goal_ranges`) with ``Random(seed)``; ``options={"goal_index": i}`` picks
    goal ``i`` of the catalog."""

    def __init__(self, catalog_path: str | Path | None = None, max_turns: int = 15, seed: int | None = None) -> None:
        super().__init__(max_turns=max_turns, seed=seed)
        self.shop = LocalShop(catalog_path, seed=seed or 0)
        self.goal_ranges = webshop_goal_ranges(len(self.shop.goals))
        self.instruction = ""
        self._episode = 0
        self._session_id: str | None = None

    def _open(self, path: str, form: dict[str, str] | None = None) -> Page:
        page = self.shop.handle(path, form)
        while page.redirect is not None:
            page = self.shop.handle(page.redirect)
        return page

    def _task_type(self) -> str:
        return self.goal.get("task_type", "other")

    def _reset(self, rng: random.Random, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        goals = self.goal_ranges[self.split]
        goal_index = options.get("goal_index", goals[rng.randrange(len(goals))])
        self._episode += 1
        if self._session_id is not None:  # one live session per env: drop the finished one
            self.shop.sessions.pop(self._session_id, None)
        sid = self._session_id = f"local{self._episode}_fixed_{goal_index}"
        session = self.shop.start_session(sid, goal_index)
        self.goal = session.goal
        self.instruction = session.goal["instruction_text"]
        self.page = self._open(f"/{sid}")
        return self.page.observation, dict(self._info(False), goal_index=goal_index)

    def expert_actions(self) -> list[str]:
        """A purchase of the goal product with the goal options (reward 1.0 on the shipped
        catalog), from the start page: search the goal's query, click it, options, buy."""
        goal = self.goal
        actions = [f"search[{goal['query'] or goal['name']}]", f"click[{goal['asin'].lower()}]"]
        actions += [f"click[{v}]" for v in goal["goal_options"].values()]
        return actions + ["click[buy now]"]
