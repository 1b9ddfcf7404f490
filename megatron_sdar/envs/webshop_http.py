"""WebShop over HTTP: a client for a running WebShop server, and a small HTML server for
the local shop (for tests and for serving a custom catalog to several trainers).

The client (:class:`WebShopHTTPEnv`) behaves like WebShop's own text environment, but over
real HTTP instead of an in-process simulated browser:

- ``reset(seed, split=...)`` opens ``{base_url}/{prefix}fixed_{goal}``; the WebShop Flask app gives
  sessions named ``..._fixed_<i>`` goal ``i``, drawn with ``Random(seed)`` among the split's goal
  indices (WebShop's own split of its goal list: test ``range(500)``, validation
  ``range(500, 1500)``, train the rest, :func:`~megatron_sdar.envs.splits.webshop_goal_ranges` of
  ``num_goals``, the number of goals the server holds), or ``options={"goal_index": i}``.
- The observation is the page's visible text nodes (outside script/style/head/title)
  joined by ``" [SEP] "`` (WebShop's "text" observation mode).
- Clickables are what WebShop's text env collects: elements with class ``btn`` (their
  text, lower-cased), ``a.product-link`` (the ASIN, lower-cased) and radio inputs (their
  ``value``). A button is followed by submitting its enclosing form (``action``, ``method``),
  a product link by its ``href``, a radio by its ``data-url`` (the page's JavaScript does
  the same in a browser).
- ``search[q]`` is allowed when the page has ``#search_input``: it submits that input's
  form with ``search_query=q`` (redirects are followed).
- The purchase page carries the reward in ``#reward pre``; the episode ends there.
"""
from __future__ import annotations

import html
import random
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from megatron_sdar.envs.base import EnvError, EnvOptionError, check_http_url
from megatron_sdar.envs.splits import WEBSHOP_GOALS, webshop_goal_ranges
from megatron_sdar.envs.webshop import LocalShop, Page, PageElement, _WebShopEnvBase

_INVISIBLE = {"script", "style", "head", "title", "meta"}
_VOID = {"input", "br", "img", "meta", "link", "hr"}


# ====================================================================== HTML -> Page
@dataclass
class _Node:
    tag: str
    attrs: dict[str, str]
    parent: "_Node | None"
    children: list["_Node | str"] = field(default_factory=list)

    def texts(self) -> list[str]:
        out: list[str] = []
        for child in self.children:
            if isinstance(child, str):
                out.append(child)
            elif child.tag not in _INVISIBLE:
                out.extend(child.texts())
        return out

    def iter(self):
        yield self
        for child in self.children:
            if isinstance(child, _Node):
                yield from child.iter()

    def ancestor(self, tag: str) -> "_Node | None":
        node = self.parent
        while node is not None and node.tag != tag:
            node = node.parent
        return node


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = _Node("[document]", {}, None)
        self.current = self.root

    def handle_starttag(self, tag, attrs):
        node = _Node(tag, {k: (v or "") for k, v in attrs}, self.current)
        self.current.children.append(node)
        if tag not in _VOID:
            self.current = node

    def handle_endtag(self, tag):
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


@dataclass
class ParsedPage:
    observation: str
    clickables: dict[str, tuple[str, str]]  # name -> (method, url)
    search_form: tuple[str, str] | None  # (method, url) of the form holding #search_input
    instruction: str
    reward: float | None


def parse_webshop_html(text: str, page_url: str) -> ParsedPage:
    builder = _TreeBuilder()
    builder.feed(text)
    root = builder.root
    visible = [t.strip() for t in root.texts() if t.strip()]
    clickables: dict[str, tuple[str, str]] = {}
    search_form = None
    instruction = ""
    reward = None
    for node in root.iter():
        classes = node.attrs.get("class", "").split()
        if "btn" in classes:
            form = node.ancestor("form")
            name = " ".join("".join(node.texts()).split()).lower()
            if form is not None and name and name != "search":  # WebShop never clicks the search button
                clickables[name] = (form.attrs.get("method", "get").upper(),
                                    urllib.parse.urljoin(page_url, form.attrs.get("action", "")))
        elif node.tag == "a" and "product-link" in classes:
            clickables["".join(node.texts()).strip().lower()] = ("GET", urllib.parse.urljoin(page_url, node.attrs["href"]))
        elif node.tag == "input" and node.attrs.get("type") == "radio" and "data-url" in node.attrs:
            clickables[node.attrs.get("value", "").lower()] = ("GET", urllib.parse.urljoin(page_url, node.attrs["data-url"]))
        if node.attrs.get("id") == "search_input":
            form = node.ancestor("form")
            if form is not None:
                search_form = (form.attrs.get("method", "post").upper(),
                               urllib.parse.urljoin(page_url, form.attrs.get("action", "")))
        elif node.attrs.get("id") == "instruction-text":
            parts = [t.strip() for t in node.texts() if t.strip()]
            instruction = " ".join(p for p in parts if p.lower() != "instruction:")
            if instruction.lower().startswith("instruction:"):
                instruction = instruction[len("instruction:"):].strip()
        elif node.attrs.get("id") == "reward":
            pre = next((n for n in node.iter() if n.tag == "pre"), None)
            if pre is not None:
                try:
                    reward = float("".join(pre.texts()).strip())
                except ValueError:
                    raise EnvError(f"WebShop page {page_url}: unreadable reward {''.join(pre.texts())!r}") from None
    return ParsedPage(" [SEP] ".join(visible), clickables, search_form, instruction, reward)


# ====================================================================== client env
class WebShopHTTPEnv(_WebShopEnvBase):
    """Client for a running WebShop server (``python -m web_agent_site.app`` of the WebShop
    repository, or :func:`serve_local_shop`). ``num_goals``: the goals the server holds (12,087,
    WebShop's human instructions, by default)."""

    def __init__(self, base_url: str = "http://127.0.0.1:3000", num_goals: int = WEBSHOP_GOALS,
                 session_prefix: str = "sdar", max_turns: int = 15, timeout_s: float = 30.0,
                 seed: int | None = None) -> None:
        super().__init__(max_turns=max_turns, seed=seed)
        self.base_url = base_url.rstrip("/")
        self.num_goals = num_goals
        self.goal_ranges = webshop_goal_ranges(num_goals)
        self.session_prefix = session_prefix
        self.timeout_s = timeout_s
        self.instruction = ""
        self._episode = 0

    @classmethod
    def check_options(cls, base_url: str = "http://127.0.0.1:3000", num_goals: int = WEBSHOP_GOALS,
                      timeout_s: float = 30.0, **_: Any) -> None:
        """An http(s) ``base_url``, a goal count that splits into train, validation and test, and a
        positive ``timeout_s`` (whether the server answers is known only when the run plays)."""
        check_http_url("base_url", base_url)
        try:
            webshop_goal_ranges(int(num_goals))
        except (EnvError, TypeError, ValueError) as exc:
            raise EnvOptionError("num_goals", str(exc)) from None
        if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise EnvOptionError("timeout_s", f"must be > 0 seconds, got {timeout_s!r}")

    def _fetch(self, method: str, url: str, form: dict[str, str] | None = None) -> Page:
        data = urllib.parse.urlencode(form).encode() if form is not None else (b"" if method == "POST" else None)
        request = urllib.request.Request(url, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                text = response.read().decode("utf-8", errors="replace")
                final_url = response.geturl()
        except urllib.error.URLError as exc:
            raise EnvError(f"WebShop server {self.base_url}: {method} {url} failed: {exc}") from None
        parsed = parse_webshop_html(text, final_url)
        if parsed.instruction:
            self.instruction = parsed.instruction
        # Re-express the parsed page as a Page so the shared step logic applies unchanged.
        elements = [PageElement("button", name, target=f"{m} {u}") for name, (m, u) in parsed.clickables.items()]
        if parsed.search_form is not None:
            elements.append(PageElement("search", "", target=f"{parsed.search_form[0]} {parsed.search_form[1]}"))
        return Page("done" if parsed.reward is not None else "page", elements, reward=parsed.reward,
                    observation_override=parsed.observation)

    def _open(self, target: str, form: dict[str, str] | None = None) -> Page:
        method, url = target.split(" ", 1)
        return self._fetch(method, url, form)

    def _reset(self, rng: random.Random, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        goals = self.goal_ranges[self.split]
        goal = options.get("goal_index", goals[rng.randrange(len(goals))])
        self._episode += 1
        session = f"{self.session_prefix}{self._episode}_fixed_{goal}"
        self.instruction = ""
        self.page = self._fetch("GET", f"{self.base_url}/{urllib.parse.quote(session)}")
        return self.page.observation, dict(self._info(False), goal_index=goal)


# ====================================================================== HTML server
def render_page_html(page: Page) -> str:
    """HTML with WebShop's structure (classes/ids the WebShop text env and our client read)."""
    esc = html.escape
    body: list[str] = []
    for el in page.elements:
        if el.kind == "instruction":
            body.append(f'<div id="instruction-text"><h4>Instruction:<br>{esc(el.text)}</h4></div>')
        elif el.kind == "text":
            body.append(f"<p>{esc(el.text)}</p>")
        elif el.kind == "button":
            body.append(f'<form method="post" action="{esc(el.target)}">'
                        f'<button type="submit" class="btn btn-primary">{esc(el.text)}</button></form>')
        elif el.kind == "link":
            body.append(f'<a class="product-link" href="{esc(el.target)}">{esc(el.text)}</a>')
        elif el.kind == "radio":
            body.append(f'<input type="radio" name="{esc(el.group)}" value="{esc(el.text)}" data-url="{esc(el.target)}">'
                        f"<label>{esc(el.text)}</label>")
        elif el.kind == "search":
            body.append(f'<form method="post" action="{esc(el.target)}"><input id="search_input" type="text" '
                        f'name="search_query"><button type="submit" class="btn btn-success">Search</button></form>')
        elif el.kind == "reward":
            body.append(f'<h3 id="reward">Your score (min 0.0, max 1.0)<pre>{esc(el.text)}</pre></h3>')
    # The reward element repeats the score caption: drop the plain-text copy before it.
    if page.kind == "done":
        body = [b for b in body if b != "<p>Your score (min 0.0, max 1.0)</p>"]
    return ("<!DOCTYPE html><html><head><title>WebShop</title><script>var x = 1;</script></head><body>"
            + "\n".join(body) + "</body></html>")


def serve_local_shop(shop: LocalShop, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Serve ``shop`` under WebShop's routes in a daemon thread. Returns (server, base_url);
    stop it with ``server.shutdown(); server.server_close()``."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self, form: dict[str, str] | None) -> None:
            path = urllib.parse.urlsplit(self.path).path
            try:
                with lock:  # LocalShop keeps per-session state in plain dicts
                    page = shop.handle(path, form)
            except (KeyError, ValueError, SyntaxError) as exc:
                self.send_error(404, f"no such page: {exc}")
                return
            if page.redirect is not None:
                self._send(302, b"", Location=page.redirect)
            else:
                self._send(200, render_page_html(page).encode("utf-8"), **{"Content-Type": "text/html; charset=utf-8"})

        def _send(self, status: int, payload: bytes, **headers: str) -> None:
            self.send_response(status)
            for key, value in dict(headers, **{"Content-Length": str(len(payload))}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self):  # noqa: N802 (http.server naming)
            self._serve(None)

        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode("utf-8") if length else ""
            self._serve({k: v[0] for k, v in urllib.parse.parse_qs(raw).items()})

        def log_message(self, *args):  # keep test output quiet
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="webshop-http", daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}"
