"""WebShop: local shop reward (exact and partial credit) and the HTTP client against a
real local HTTP server speaking WebShop's routes."""
import json

import pytest

from megatron_sdar.envs import EnvError, make
from megatron_sdar.envs.webshop import LocalShop, webshop_reward
from megatron_sdar.envs.webshop_http import WebShopHTTPEnv, parse_webshop_html, serve_local_shop


def run(env, actions):
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        assert not info["invalid_action"], (action, obs)
    return obs, reward, terminated, info


def test_exact_target_and_options_score_one_for_every_goal():
    env = make("webshop")
    for g in range(len(env.shop.goals)):
        env.reset(options={"goal_index": g})
        obs, reward, terminated, info = run(env, env.expert_actions())
        assert terminated and reward == 1.0 and info["won"], g
        assert obs.endswith("[SEP] 1.0")


@pytest.mark.parametrize("actions, expected", [
    # goal 0: cotton + machine wash, size medium, color navy, price < 20 -> denominator 2 + 2 + 1 = 5
    (["search[cotton t-shirt]", "click[b0sdar0001]", "click[large]", "click[navy]", "click[buy now]"], 4 / 5),
    (["search[cotton t-shirt]", "click[b0sdar0001]", "click[buy now]"], 3 / 5),  # no option chosen
    # performance tee: same query (r_type 1), no attribute, size matches, black does not, price ok
    (["search[t-shirt]", "click[b0sdar0002]", "click[medium]", "click[black]", "click[buy now]"], 2 / 5),
    # a wallet: no shared content word with "crew neck t-shirt" -> r_type 0
    (["search[wallet]", "click[b0sdar0013]", "click[tan]", "click[buy now]"], 0.0),
])
def test_partial_credit_follows_the_webshop_formula(actions, expected):
    env = make("webshop")
    env.reset(options={"goal_index": 0})
    _, reward, terminated, info = run(env, actions)
    assert terminated and reward == pytest.approx(expected, abs=1e-6)
    assert info["won"] is False


def test_reward_components_by_hand():
    product = {"name": "organic green tea", "query": "green tea", "product_category": "Food › Tea › Green",
               "Title": "Organic Green Tea", "BulletPoints": ["caffeinated"], "Description": "", "Attributes": ["organic"]}
    goal = {"name": "green tea bags", "query": "tea", "product_category": "Food › Coffee",
            "attributes": ["organic", "decaf"], "goal_options": {"size": "50 count", "flavor": "jasmine"},
            "price_upper": 10.0}
    r = webshop_reward(product, goal, price=12.0, options={"size": "50 count", "flavor": "jasmine tea"})
    # title score 2/3 > 0.2 -> r_type 1; attrs: organic yes, decaf no; options: size exact, flavor fuzzy; price fails
    assert (r.r_type, r.attribute_matches, r.option_matches, r.price_ok) == (1.0, 1, 2, False)
    assert r.total == pytest.approx(3 / 5)
    weak = webshop_reward(dict(product, name="black tea"), dict(goal, name="green chai blend mix"), 5.0, {})
    # title score 0 -> r_type 0 whatever else matches
    assert weak.title_score == 0.0 and weak.total == 0.0
    half = webshop_reward(dict(product, name="tea sampler x y z"), dict(goal, name="tea gift box set"), 5.0, {})
    # title score 1/4 = 0.25 > 0.2 keeps r_type 1; 1/5 would drop it to 0.5 (no query/category match)
    assert half.r_type == 1.0
    low = webshop_reward(dict(product, name="tea"), dict(goal, name="tea gift box set basket"), 5.0, {})
    assert low.title_score == pytest.approx(0.2) and low.r_type == 0.5


def test_invalid_actions_keep_the_page():
    env = make("webshop")
    obs0, info = env.reset(options={"goal_index": 1})
    for bad in ["click[buy now]", "buy it", "search[]", "click[nonexistent]"]:
        obs, reward, terminated, _, info = env.step(bad)
        assert obs == obs0 and info["invalid_action"] and not terminated and reward == 0.0
    obs, *_, info = env.step("search[rain jacket]")
    assert not info["invalid_action"] and "search[<query>]" not in info["admissible_actions"]
    obs, *_, info = env.step("search[shoes]")  # no search bar on a results page
    assert info["invalid_action"]


def test_http_client_matches_local_shop_over_a_real_server():
    server, url = serve_local_shop(LocalShop())
    try:
        local = make("webshop")
        client = make("webshop", base_url=url, num_goals=len(local.shop.goals))
        assert isinstance(client, WebShopHTTPEnv)
        episodes = [(0, None), (3, None),
                    (0, ["search[t-shirt]", "click[b0sdar0002]", "click[features]", "click[< prev]",
                         "click[medium]", "click[black]", "click[buy now]"])]
        for goal, actions in episodes:
            obs_l, info_l = local.reset(options={"goal_index": goal})
            obs_c, info_c = client.reset(options={"goal_index": goal})
            assert obs_c == obs_l and info_c["task"] == info_l["task"]
            assert info_c["admissible_actions"] == info_l["admissible_actions"]
            for action in actions or local.expert_actions():
                step_l, step_c = local.step(action), client.step(action)
                assert step_c[0] == step_l[0] and step_c[1:4] == step_l[1:4], action
                assert step_c[4]["admissible_actions"] == step_l[4]["admissible_actions"]
            assert step_c[2] and step_c[1] == (1.0 if actions is None else pytest.approx(0.4))
        # Invalid click over HTTP: no request, page unchanged.
        obs, _ = client.reset(seed=4)
        assert client.step("click[nothing here]")[4]["invalid_action"]
    finally:
        server.shutdown()
        server.server_close()


def test_http_client_errors_are_clear():
    client = WebShopHTTPEnv("http://127.0.0.1:9", num_goals=3, timeout_s=2)  # discard port: refused
    with pytest.raises(EnvError, match="WebShop server"):
        client.reset(seed=0)
    page = parse_webshop_html('<h3 id="reward">score<pre>0.25</pre></h3><script>hidden()</script>', "http://x/")
    assert page.reward == 0.25 and "hidden" not in page.observation


def test_catalog_errors(tmp_path):
    bad = tmp_path / "catalog.json"
    bad.write_text("{not json")
    with pytest.raises(EnvError, match="not valid JSON"):
        make("webshop", catalog_path=bad)
    bad.write_text(json.dumps({"products": [{"asin": "A1", "name": "x", "Title": "x", "Price": 1.0}],
                               "goals": [{"asin": "ZZZ", "instruction_text": "buy"}]}))
    with pytest.raises(EnvError, match="unknown asin 'ZZZ'"):
        make("webshop", catalog_path=bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make("webshop", catalog_path=tmp_path / "missing.json")
