"""The pieces of "learning you can see": the SFT data (what it teaches and what it must not), the
fresh optimizer at the start of RL, disjoint task seeds, the confidence intervals, the
action-token mask."""
from __future__ import annotations

import math

import pytest

from megatron_sdar.testing import run_distributed
from tests.test_envs_household import embedded_world


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    from megatron_sdar.envs.household import HouseholdConfig, corpus_text
    from megatron_sdar.models.tiny import build_tokenizer
    from megatron_sdar.rollout.agent_loop import ChatFormatter
    from tests.configs import loop_config
    from megatron_sdar.trainer import seeds

    world = HouseholdConfig(**embedded_world())
    tokenizer = build_tokenizer(tmp_path_factory.mktemp("sft_tok"), vocab_size=768,
                                extra_text=corpus_text(world, seeds.corpus_seeds(20)))
    config = loop_config(max_turns=10, history_window=1, max_prompt_tokens=1024, action_format="prefix",
                         context_position="end", restate_task=False)
    return world, tokenizer, config, ChatFormatter(tokenizer, config)


def test_demonstrations_teach_reading_a_skill_not_the_homes(sft_setup):
    from megatron_sdar.envs.household import DEFAULT_HOMES, _possible_homes, demonstrations
    from megatron_sdar.trainer import seeds

    world, *_ = sft_setup
    demos = demonstrations(world, seeds.sft_seeds(0, 1200), skill_share=0.5, seed=0)
    with_skill = [d for d in demos if d.context]
    plain = [d for d in demos if not d.context]
    assert abs(len(with_skill) / len(demos) - 0.5) < 0.05
    # plain demonstrations: uniform placement, so the true home is where the object starts only by chance
    plain_at_home = sum(d.start_kind == DEFAULT_HOMES[d.task_type] for d in plain) / len(plain)
    # skill demonstrations: the stated home is drawn uniformly (the true one by chance), the world obeys it
    stated = [d.context.split("usually ")[1].split(" ")[2].rstrip(":") for d in with_skill]
    stated_true = sum(h == DEFAULT_HOMES[d.task_type] for h, d in zip(stated, with_skill)) / len(with_skill)
    obeyed = sum(h == d.start_kind for h, d in zip(stated, with_skill)) / len(with_skill)
    print(f"\nplain demos start at the true home {plain_at_home:.3f}; skill demos state the true home "
          f"{stated_true:.3f}, the world obeys the stated one {obeyed:.3f}")
    # the true home is stated only as often as a uniform draw over the room's possible homes gives it
    chance = sum(1 / len(_possible_homes(world, d.task_type)) for d in with_skill) / len(with_skill)
    assert plain_at_home < 0.3 and abs(stated_true - chance) < 0.05 and obeyed > 0.85
    assert len(set(stated)) >= 4  # every kind of the fixed kitchen that can hold a goal object
    # misses and recoveries: more than one receptacle visited before the goal object is taken
    def visits_before_take(demo) -> int:
        actions = [a for a, _, _ in demo.steps]
        first_take = next((i for i, a in enumerate(actions) if a.startswith("take")), len(actions))
        return sum(a.startswith("go to") for a in actions[:first_take])

    missed = sum(visits_before_take(d) > 1 for d in plain) / len(plain)
    assert missed > 0.5, missed
    assert 0.15 < sum(d.won for d in plain) / len(plain) < 0.5  # searching blind often runs out of turns
    assert sum(d.won for d in with_skill) / len(with_skill) > 0.85


def test_sft_samples_render_like_rollout_prompts(sft_setup):
    from megatron_sdar.envs import make
    from megatron_sdar.rollout.agent_loop import CONTEXT_HEADER
    from megatron_sdar.trainer import seeds
    from megatron_sdar.trainer.sft import build_sft_data

    world, tokenizer, config, formatter = sft_setup
    data = build_sft_data(lambda seed: make("household", seed=seed, **embedded_world()), formatter, tokenizer,
                          config, seeds.sft_seeds(0, 60), skill_share=0.5, seed=0)
    assert data.episodes == 60 and 15 < data.skill_episodes < 45 and len(data.samples) > 60 * 3
    texts = [tokenizer.decode(s.input_ids) for s in data.samples]
    with_context = [t for t in texts if CONTEXT_HEADER.strip() in t]
    assert with_context and len(with_context) < len(texts)
    for sample, text in zip(data.samples, texts):
        response = tokenizer.decode(sample.input_ids[sample.response_start:])
        assert response.startswith("<action>") and response.endswith("</action><|im_end|>"), response
        assert text.rstrip().endswith(response)
    # the deciding turn of a skill demonstration - its first - is repeated; its reply is the skill's "go to"
    repeated = build_sft_data(lambda seed: make("household", seed=seed, **embedded_world()), formatter, tokenizer,
                              config, seeds.sft_seeds(0, 60), skill_share=0.5, seed=0, skill_turn_repeats=3)
    assert len(repeated.samples) == len(data.samples) + 3 * data.skill_episodes
    first_turns = [s for s in repeated.samples if CONTEXT_HEADER.strip() in tokenizer.decode(s.input_ids)
                   and "Recent steps" not in tokenizer.decode(s.input_ids[:s.response_start])]
    assert len(first_turns) == 4 * data.skill_episodes
    for sample in first_turns:
        prompt, reply = (tokenizer.decode(sample.input_ids[:sample.response_start]),
                         tokenizer.decode(sample.input_ids[sample.response_start:]))
        home = prompt.split("usually ")[1].split(" ")[2].rstrip(":")
        assert reply == f"<action>go to {home}</action><|im_end|>" or reply.startswith(f"<action>go to {home} "), reply


def test_sft_demonstrations_are_train_tasks(sft_setup):
    """The oracle demonstrations of a pooled environment (WebShop, shipped catalog) are drawn from its
    train goals only: never a test or validation goal."""
    from megatron_sdar.envs import make
    from megatron_sdar.trainer import seeds
    from megatron_sdar.trainer.sft import build_sft_data

    _, tokenizer, config, formatter = sft_setup
    built = []

    def make_env(seed):
        built.append(make("webshop", seed=seed))
        return built[-1]

    data = build_sft_data(make_env, formatter, tokenizer, config, seeds.sft_seeds(0, 40), skill_share=0.0, seed=0)
    played = [env for env in built if hasattr(env, "goal")]
    assert data.episodes == len(played) == 40 and data.samples
    goals = {next(i for i, goal in enumerate(env.shop.goals) if goal is env.goal) for env in played}
    assert goals == set(range(2, 10))  # the 8 train goals; goal 0 is test, goal 1 validation
    assert goals == set(played[0].goal_ranges["train"])


def _optimizer_moments(policy) -> list[float]:
    import torch

    moments = []
    for opt in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer]):
        for state in opt.optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    moments.append(float(torch.as_tensor(state[key]).abs().sum()))
    return moments


def _reset_optimizer(model_dir: str) -> dict:
    import torch

    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.trainer.policy import OptimConfig, build_policy
    from megatron_sdar.utils.device import causal_attention_mask

    arch = QwenArchitecture.from_hf_config(model_dir)
    tokens = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))

    def step(policy, lr):
        policy.zero_grad()
        logits = policy.model[0](tokens, torch.arange(12)[None].expand(2, -1), causal_attention_mask(12))
        logits[..., :5].sum().backward()
        policy.step(lr)
        return {n: p.detach().clone() for n, p in policy.unwrapped()[0].named_parameters()}

    sft = build_policy(arch, OptimConfig(lr=1e-2), hf_dir=model_dir)
    for _ in range(3):
        step(sft, 1e-2)
    before = _optimizer_moments(sft)
    start = {n: p.detach().clone() for n, p in sft.unwrapped()[0].named_parameters()}
    sft.reset_optimizer()
    after = _optimizer_moments(sft)
    moved = step(sft, 1e-3)
    # a policy built from the same weights with a new optimizer takes the identical first step
    fresh = build_policy(arch, OptimConfig(lr=1e-2), hf_dir=model_dir)
    with torch.no_grad():
        for n, p in fresh.unwrapped()[0].named_parameters():
            p.copy_(start[n])
    expected = step(fresh, 1e-3)
    return {"before": before, "after": after,
            "diff": max(float((moved[n] - expected[n]).abs().max()) for n in moved)}


@pytest.mark.multiproc
def test_rl_starts_with_a_fresh_optimizer(tmp_path):
    from megatron_sdar.models.tiny import build_tiny_qwen

    model_dir = str(build_tiny_qwen(tmp_path / "m", "qwen2", seed=3))
    out = run_distributed(_reset_optimizer, world_size=1, args=(model_dir,), timeout=240)[0]
    assert out["before"] and sum(out["before"]) > 0  # SFT left moments behind
    assert sum(out["after"]) == 0.0  # gone after the reset (empty state or zeros)
    assert out["diff"] == 0.0  # the first RL step is a first Adam step


def test_task_seeds_are_disjoint_for_every_trainer_seed():
    from megatron_sdar.trainer import seeds

    eval_set = set(seeds.eval_seeds(2000))  # the test split
    validation = set(seeds.eval_seeds(2000, "validation"))
    assert seeds.eval_seeds(5) == seeds.eval_seeds(5, "test") and len(eval_set) == len(validation) == 2000
    sft, train = set(), set()
    for trainer_seed in range(8):
        s = set(seeds.sft_seeds(trainer_seed, 2000))
        t = {x for step in range(200) for x in seeds.train_seeds(trainer_seed, step, 8)}
        assert not (s & sft) and not (t & train)  # seeds differ between trainer seeds too
        sft |= s
        train |= t
    corpus = set(seeds.corpus_seeds(500))
    assert not (eval_set & sft) and not (eval_set & train) and not (sft & train) and not (corpus & (eval_set | sft | train))
    assert not validation & (eval_set | sft | train | corpus)  # the fourth range: disjoint from the other four
    with pytest.raises(ValueError, match="split"):
        seeds.eval_seeds(5, "dev")
    with pytest.raises(ValueError, match="outside"):
        seeds.task_seed(seeds.TRAIN, 2**30)


def test_confidence_intervals():
    from megatron_sdar.utils.stats import mean_ci, t_quantile_975, wilson_interval

    def wilson_by_root(k, n, z=1.959963984540054):
        # the interval's ends are the roots of (p - k/n)^2 = z^2 p (1 - p) / n
        a, b, c = 1 + z * z / n, -(2 * k / n + z * z / n), (k / n) ** 2
        d = math.sqrt(b * b - 4 * a * c)
        return (-b - d) / (2 * a), (-b + d) / (2 * a)

    for k, n in ((0, 10), (5, 10), (50, 200), (199, 200), (83, 200)):
        low, high = wilson_interval(k, n)
        ref = wilson_by_root(k, n)
        assert abs(low - max(0.0, ref[0])) < 1e-12 and abs(high - min(1.0, ref[1])) < 1e-12
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(100, 200)  # +-0.07: 200 tasks resolve a 0.05 difference only barely
    assert 0.43 < low < 0.432 and 0.568 < high < 0.57
    assert t_quantile_975(2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile_975(60) == pytest.approx(2.0003, abs=2e-4) and t_quantile_975(1000) == pytest.approx(1.9623, abs=2e-4)
    mean, half = mean_ci([0.4, 0.5, 0.6])
    assert mean == pytest.approx(0.5) and half == pytest.approx(4.3027 * 0.1 / math.sqrt(3), rel=1e-4)
    assert math.isnan(mean_ci([0.3])[1])


def test_action_token_mask(tmp_path):
    from megatron_sdar.models.tiny import build_tokenizer
    from megatron_sdar.rollout.agent_loop import action_token_mask

    tok = build_tokenizer(tmp_path)
    for text, action in (("<action>12</action>", "12"), ("<think>hm</think><action>go to fridge 1</action>", "go to fridge 1")):
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        mask = action_token_mask(tok, ids, r"<action>(.*?)</action>")
        spelled = tok.decode([i for i, m in zip(ids, mask) if m])
        assert spelled.replace(">", "").replace("<", "").strip().endswith(action.split()[-1]) and action in spelled, spelled
        assert mask[-1] == 0 and sum(mask) < len(ids)
    no_tags = tok("go to desk 1", add_special_tokens=False)["input_ids"]
    assert not any(action_token_mask(tok, no_tags, r"<action>(.*?)</action>"))  # nothing parsed: no action
    assert all(action_token_mask(tok, no_tags, None))  # no pattern: the whole response is the action


def test_collapse_warning_and_success_contrast():
    from megatron_sdar.rollout.trajectory import Episode, TrajectoryBatch
    from megatron_sdar.trainer.loop import COLLAPSE_ENTROPY, collapse_warning

    def episodes(*groups):
        return [Episode(group=g, task="t", task_type="cool", seed=g, won=won) for g, wins in enumerate(groups)
                for won in wins]

    summary = TrajectoryBatch(episodes([True, False], [False, False], [True, True], [False, True])).summary()
    assert summary["rollout/success_contrast_groups"] == 0.5 and summary["rollout/success_rate"] == 0.5
    stuck = TrajectoryBatch(episodes([False, False], [False, False])).summary()
    assert stuck["rollout/success_contrast_groups"] == 0.0
    low = COLLAPSE_ENTROPY / 2
    warning = collapse_warning({**stuck, "actor/action_entropy": low})
    assert warning is not None and "collapsing" in warning and f"{low:.3f}" in warning
    assert collapse_warning({**stuck, "actor/action_entropy": 2 * COLLAPSE_ENTROPY}) is None  # still exploring
    assert collapse_warning({**summary, "actor/action_entropy": low}) is None  # successes to learn from
    solved = TrajectoryBatch(episodes([True, True], [True, True])).summary()
    assert collapse_warning({**solved, "actor/action_entropy": low}) is None  # deterministic and right
    assert collapse_warning(stuck) is None  # no action tokens measured
