"""Search-QA: BM25 over the shipped corpus, EM/F1, the episode, and the retrieval-server client."""
import pytest

from megatron_sdar.envs import EnvError, make
from megatron_sdar.envs.search_qa import BM25Retriever, HTTPRetriever, parse_search_action, serve_retriever
from megatron_sdar.envs.text_match import exact_match, f1_score, normalize_answer


def test_bm25_finds_the_gold_passage_in_the_top3_for_single_hop_questions():
    env = make("search")
    retriever = BM25Retriever()
    single = [q for q in env.questions if q["hops"] == "single_hop"]
    multi = [q for q in env.questions if q["hops"] == "multi_hop"]
    assert len(single) >= 10 and len(multi) >= 5
    hits = sum(q["gold_passages"][0] in [p.id for p in retriever.retrieve(q["question"], 3)] for q in single)
    print(f"BM25 top-3 gold hit rate (single-hop): {hits}/{len(single)}")
    assert hits == len(single)


@pytest.mark.parametrize("pred, golds, em, f1", [
    ("Lorrenport", ["Lorrenport"], 1.0, 1.0),
    ("  the Lorrenport. ", ["lorrenport"], 1.0, 1.0),  # articles, case, punctuation, spaces
    ("Vell", ["the Vell River"], 0.0, 2 / 3),  # P = 1/1, R = 1/2
    ("the old silver mark", ["silver mark"], 0.0, 0.8),  # P = 2/3, R = 2/2 -> 0.8
    ("Pell Arandt from Tessovar", ["Pell Arandt", "Pell Arandt from Tessovar"], 1.0, 1.0),
    ("1825", ["1826"], 0.0, 0.0),
    ("", ["x"], 0.0, 0.0),
])
def test_exact_match_and_f1_hand_checked(pred, golds, em, f1):
    assert exact_match(pred, golds) == em
    assert f1_score(pred, golds) == pytest.approx(f1)


def test_normalization():
    assert normalize_answer("The  Grey-Sea, an ocean!") == "greysea ocean"


def test_episode_search_then_answer():
    env = make("search", reward="f1")
    q11 = [q["key"] for q in env.splits["train"]].index("q11")  # multi-hop: birthplace of the first director
    obs, info = env.reset(options={"question_index": q11})
    assert info["question_id"] == "q11"
    assert obs == info["task"] and info["task_type"] == "multi_hop_reasoning"
    obs, reward, terminated, _, info = env.step("<think>who directed it?</think><search>first director Amberline Observatory</search>")
    assert obs.startswith("<information>Doc 1(Title: Amberline Observatory)") and not terminated
    obs, reward, terminated, _, info = env.step("<search>Idra Falk born</search>")
    assert "p07" in info["retrieved_ids"]
    obs, reward, terminated, truncated, info = env.step("<answer>the town of Marrowdale</answer><answer>x</answer>")
    assert terminated and info["em"] == 0.0 and reward == pytest.approx(info["f1"]) and reward == pytest.approx(0.5)
    assert info["won"] is False


def test_invalid_actions_and_truncation():
    env = make("search", max_turns=2)
    env.reset(seed=1)
    obs, reward, terminated, truncated, info = env.step("I think it is Lorrenport")
    assert info["invalid_action"] and "<search>" in obs and not terminated
    obs, reward, terminated, truncated, info = env.step("<search></search>")
    assert info["invalid_action"] and truncated
    assert parse_search_action("<ANSWER> x </ANSWER>") == ("answer", "x")


def test_http_retriever_against_a_local_retrieval_server():
    server, url = serve_retriever(BM25Retriever())
    try:
        env = make("search", retriever_url=url)
        env.reset(options={"question_index": 0})  # q01, the first train question
        obs, *_, info = env.step("<search>capital of Kestria</search>")
        assert info["retrieved_ids"][0] == "p04" and "Doc 1(Title: Kestria)" in obs
        assert [p.id for p in HTTPRetriever(url).retrieve("Vell River length", 2)] == \
               [p.id for p in BM25Retriever().retrieve("Vell River length", 2)]
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(EnvError, match="retrieval server"):
        HTTPRetriever("http://127.0.0.1:9", timeout_s=2).retrieve("x", 1)


def test_data_file_errors(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"id": "a", "question": "q"}\n')
    with pytest.raises(EnvError, match="misses \\['answers'\\]"):
        make("search", train_questions=bad)
    bad.write_text("nope\n")
    with pytest.raises(EnvError, match="q.jsonl:1: not valid JSON"):
        make("search", test_questions=[bad])
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        make("search", test_questions=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="reward must be"):
        make("search", reward="bleu")
