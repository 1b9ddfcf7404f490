"""The colocated vLLM rollout engine, the Megatron -> vLLM weight sync and the multi-turn agent loop,
with a tiny Qwen2, the real vLLM engine and the built-in household world."""
import pytest

from megatron_sdar.envs.household import HouseholdEnv
from megatron_sdar.testing import run_distributed
from tests.configs import loop_config

from megatron_sdar.trainer.rehearsal import LOGPROB_BOUND  # fp32 on CPU; larger means a resharding or sync bug


def _megatron_logprobs(model, sequences, starts):
    """Megatron's log-probs of ``seq[start:]`` for each sequence (TP-sharded logits, PP=1)."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_sdar.algo.vocab_parallel import vocab_parallel_gather_logprobs
    from megatron_sdar.utils.device import causal_attention_mask

    out = []
    with torch.no_grad():
        for seq, start in zip(sequences, starts):
            ids = torch.tensor([seq])
            logits = model(ids, torch.arange(len(seq))[None], causal_attention_mask(len(seq)))
            lp = vocab_parallel_gather_logprobs(logits[0, start - 1:-1].float(), ids[0, start:][:, None],
                                                ps.get_tensor_model_parallel_group())
            out.append(lp[:, 0].tolist())
    return out


def _max_diff(a, b):
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


class _FlakyHousehold(HouseholdEnv):
    """A household environment whose step raises on its second call (a broken env server)."""

    def _step(self, action):
        if self._turn >= 2:
            raise ConnectionError("environment server went away")
        return super()._step(action)


def _rollout_sync_and_step(model_dir: str, rank_episodes: list[int], raise_on: int | None, rollout_tp: int = 1):
    """Rollout with G=4 groups, check token round trip and log-probs, take a Megatron optimizer
    step, resync, check vLLM's scores of the same tokens moved with the weights. ``rank_episodes``:
    episodes per rollout replica (the ``rollout_tp`` ranks of a replica play the same ones)."""
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from megatron_sdar.envs import make
    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.rollout import (AgentLoop, EpisodeSpec, MegatronWeightSource,
                                       RolloutEngine, RolloutEngineConfig, TrajectoryBatch)
    from megatron_sdar.algo.objective import preset
    from megatron_sdar.skills import SkillBank, SkillRetriever, builtin_skill_dir
    from megatron_sdar.trainer.batch import samples_from_trajectories
    from megatron_sdar.trainer.policy import OptimConfig, build_policy
    from megatron_sdar.trainer.teacher import TeacherBatch

    rank = dist.get_rank()
    arch = QwenArchitecture.from_hf_config(model_dir)
    policy = build_policy(arch, OptimConfig(lr=3e-3, clip_grad=0.0), hf_dir=model_dir)
    model = policy.unwrapped()[0]
    # perturb the trainer's weights before the first sync: vLLM's checkpoint weights are stale
    torch.manual_seed(7)  # same on every rank: replicated parameters stay replicated
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p))
    # the trainer imports its environment before the engine starts; bm25s (search, WebShop) imports
    # numba, whose llvmlite wrapper broke vLLM's start-up scan (patches.shield_llvmlite_from_vllm_kernel_scan)
    import sys

    import megatron_sdar.envs.bm25_index  # noqa: F401

    assert "llvmlite.binding.ffi" in sys.modules
    engine = RolloutEngine(model_dir, RolloutEngineConfig(tp=rollout_tp, max_model_len=512))
    replica = engine.dp_rank
    source = MegatronWeightSource(policy.model, arch, bucket_mb=0.25)
    import logging

    reload_log: list[str] = []  # what vLLM's in-place reload logs (the layerwise loader's logger)
    handler = logging.Handler()
    handler.emit = lambda record: reload_log.append(record.getMessage())
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addHandler(handler)
    stats = engine.sync_weights(source)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    retriever = SkillRetriever(SkillBank.from_dir(builtin_skill_dir("household")), mode="keyword")
    config = loop_config(max_turns=3, history_window=2, max_prompt_tokens=400, max_response_tokens=12,
                         action_pattern=None, action_format="text", context_position="start", restate_task=False,
                         progress=False)
    loop = AgentLoop(engine, tokenizer, config, retriever)
    groups = 2 * engine.dp_size
    specs = []
    for k in range(rank_episodes[replica]):  # G=4 episodes per task, two tasks per replica
        group = 2 * replica + k // 4
        flaky = raise_on is not None and group * 4 + k % 4 == raise_on
        env = _FlakyHousehold(seed=group) if flaky else make("household", seed=group)
        specs.append(EpisodeSpec(env=env, group=group, task_seed=100 + group, episode_id=group * 4 + k % 4))
    batch = loop.run(specs)

    result = {"sync_bytes": stats.bytes, "sync_buckets": stats.buckets, "groups": groups,
              "summary": batch.summary(), "metrics": batch.metrics,
              "episodes": [(e.group, e.num_turns, e.env_error, len(e.skill_names), e.reward, e.invalid_actions)
                           for e in batch.episodes],
              "choices": [(e.task_type, [(t.action, t.invalid_action) for t in e.turns], e.env_error,
                           e.first_choice_correct) for e in batch.episodes]}
    # the token ids the trainer rebuilds from the stored messages equal what vLLM saw
    result["roundtrip"] = all(loop.formatter.encode(t.messages) == t.prompt_ids for _, t in batch.turns())
    # the teacher batch renders the same messages with the episode's skills in front of the task
    samples = samples_from_trajectories(batch)
    result["sample_episodes"] = sorted({s.episode for s in samples})
    teacher = TeacherBatch.from_messages(samples, preset("sdar"), loop.formatter)
    with_context = {i for i, s in enumerate(samples) if s.privileged_context}
    result["teacher_has_context"] = bool(with_context) and all(
        (len(t.input_ids) > len(samples[i].input_ids)) == (i in with_context)
        and t.input_ids[t.response_start - 3:] == samples[i].input_ids[samples[i].response_start - 3:]
        for i, t in zip(teacher.indices, teacher.sequences))
    # every rank scores every rank's sequences (TP ranks must see the same input)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, batch if rank % rollout_tp == 0 else None)  # one copy per replica
    merged = TrajectoryBatch.merge([b for b in gathered if b is not None])
    turns = [t for _, t in merged.turns()]
    seqs = [t.input_ids for t in turns]
    starts = [t.response_start for t in turns]
    rollout_lp = [t.rollout_logprobs for t in turns]
    result["pre_diff"] = _max_diff(_megatron_logprobs(model, seqs, starts), rollout_lp)
    result["turns"] = len(turns)

    # one Megatron optimizer step on the rollout's tokens (maximize their likelihood), then resync
    policy.zero_grad()
    from megatron.core import parallel_state as ps

    from megatron_sdar.algo.vocab_parallel import vocab_parallel_gather_logprobs
    from megatron_sdar.utils.device import causal_attention_mask
    for seq, start in zip(seqs[:4], starts[:4]):
        ids = torch.tensor([seq])
        logits = policy.model[0](ids, torch.arange(len(seq))[None], causal_attention_mask(len(seq)))
        lp = vocab_parallel_gather_logprobs(logits[0, start - 1:-1].float(), ids[0, start:][:, None],
                                            ps.get_tensor_model_parallel_group())
        (-lp.mean()).backward()
    update = policy.step()
    result["applied"], result["grad_norm"] = update.applied, update.grad_norm
    engine.sync_weights(source)
    vllm_after = engine.score(seqs, starts)
    result["post_diff"] = _max_diff(_megatron_logprobs(model, seqs, starts), vllm_after)
    result["moved"] = _max_diff(vllm_after, rollout_lp)
    result["reload_log"] = reload_log
    if rollout_tp > 1:  # the ranks of a replica that would submit different requests get an error, not a hang
        from megatron_sdar.rollout.engine import RolloutEngineError, SamplingConfig

        try:
            engine.generate([[5, 6, 7, 8 + rank]], SamplingConfig(max_tokens=2), seeds=[0])
            result["mismatch_error"] = None
        except RolloutEngineError as exc:
            result["mismatch_error"] = str(exc)
    engine.shutdown()
    return result


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    from megatron_sdar.models.tiny import build_tiny_qwen

    return str(build_tiny_qwen(tmp_path_factory.mktemp("rollout") / "qwen2", "qwen2"))


@pytest.mark.multiproc
def test_rollout_sync_step_resync_single_process(tiny_qwen2):
    """G=4 groups on one rank; one episode's environment raises mid-episode."""
    result = run_distributed(_rollout_sync_and_step, world_size=1, args=(tiny_qwen2, [8], 5),
                             timeout=600, env={"OMP_NUM_THREADS": "2"})[0]
    assert result["sync_buckets"] > 1 and result["sync_bytes"] > 4e6  # 0.25 MB buckets, ~5 MB model
    assert result["roundtrip"] and result["teacher_has_context"]
    assert result["turns"] > 8  # multi-turn
    assert result["pre_diff"] < LOGPROB_BOUND, result["pre_diff"]
    assert result["applied"] and result["grad_norm"] > 0
    assert result["post_diff"] < LOGPROB_BOUND, result["post_diff"]
    assert result["moved"] > 10 * LOGPROB_BOUND, result["moved"]
    episodes = result["episodes"]
    assert len(episodes) == 8 and {g for g, *_ in episodes} == {0, 1}
    broken = [e for e in episodes if e[2] is not None]
    assert len(broken) == 1 and "environment server went away" in broken[0][2]
    assert result["summary"]["rollout/env_errors"] == 1.0
    # the others ran to the turn limit (a random policy never solves a task)
    assert all(turns == 3 for g, turns, err, *_ in episodes if err is None)
    assert all(n_skills == 1 for *_, n_skills, _, _ in episodes)  # keyword retrieval, one skill per task
    # every unsolved turn counts as invalid or not; reward = -0.1 x invalid actions
    assert all(abs(reward + 0.1 * invalid) < 1e-9 for *_, reward, invalid in episodes)
    assert result["metrics"]["rollout/tokens_per_s"] > 0
    # each episode carries the environment's verdict on its first decisive choice: recomputed from its
    # actions, the first valid "go to" (the default world's homes: DEFAULT_HOMES by task type)
    from megatron_sdar.envs.household import DEFAULT_HOMES, is_home

    for task_type, actions, error, verdict in result["choices"]:
        gone = [a[len("go to "):] for a, invalid in actions if a and not invalid and a.startswith("go to ")]
        if error is None:
            assert verdict == (bool(gone) and is_home(gone[0], DEFAULT_HOMES[task_type])), (task_type, actions)
    # the episode the environment failed measures nothing: out of the shares and of the training samples
    judged = [v for *_, error, v in result["choices"] if error is None]
    assert len(judged) == 7
    assert result["summary"]["rollout/first_choice_correct"] == pytest.approx(sum(judged) / len(judged))
    assert result["summary"]["rollout/turns_mean"] == 3.0  # the played episodes' turn limit
    broken_index = next(i for i, e in enumerate(episodes) if e[2] is not None)
    assert result["sample_episodes"] == [i for i in range(8) if i != broken_index]
    # the derived rotary cache is not reported as a failed weight load on every sync
    assert not [m for m in result["reload_log"] if "Failed to load weights" in m], result["reload_log"]


@pytest.mark.multiproc
def test_rollout_tp2_training_with_rollout_tp1(tiny_qwen2):
    """Training TP=2, two rollout replicas of TP=1; rank 1 has fewer episodes (lockstep)."""
    results = run_distributed(_rollout_sync_and_step, world_size=2, tp=2, args=(tiny_qwen2, [8, 4], None),
                              timeout=600, env={"OMP_NUM_THREADS": "1"})
    for result in results:
        assert result["roundtrip"]
        assert result["pre_diff"] < LOGPROB_BOUND, result["pre_diff"]
        assert result["post_diff"] < LOGPROB_BOUND, result["post_diff"]
        assert result["moved"] > 10 * LOGPROB_BOUND
    assert [len(r["episodes"]) for r in results] == [8, 4]
    assert results[0]["grad_norm"] == pytest.approx(results[1]["grad_norm"], rel=1e-6)


@pytest.mark.multiproc
@pytest.mark.parametrize("arch,ep", [("qwen3", 1), ("qwen3_moe", 2)], ids=["qwen3_tied", "qwen3_moe_ep2"])
def test_rollout_tp2_syncs_and_matches_megatron(tmp_path, arch, ep):
    """Rollout TP=2 (one vLLM replica over both ranks) beside training DP=2: a Qwen3 model with
    q/k-norm and tied embeddings (Qwen3-1.7B's options), and a Qwen3-MoE trained with EP=2. vLLM
    generates, receives the perturbed weights, matches Megatron's log-probs before and after an
    optimizer step, and its scores move with the weights. (Before the CPU backend's weight
    preparation was redone after a reload, patches.repack_cpu_weights_after_reload, the tied model
    kept sampling from its first weights' LM head, 0.2-0.4 nats off, and the MoE's experts were
    scrambled, 0.2-1.9 nats off.)"""
    from megatron_sdar.models.tiny import build_tiny_qwen

    model_dir = str(build_tiny_qwen(tmp_path / arch, arch, head_dim=64))
    results = run_distributed(_rollout_sync_and_step, world_size=2, ep=ep, args=(model_dir, [8], None, 2),
                              timeout=600, env={"OMP_NUM_THREADS": "1"})
    for result in results:
        assert result["roundtrip"] and result["turns"] > 8
        assert result["pre_diff"] < LOGPROB_BOUND, result["pre_diff"]
        assert result["post_diff"] < LOGPROB_BOUND, result["post_diff"]
        assert result["moved"] > 100 * LOGPROB_BOUND, result["moved"]
    assert all("ranks of rollout replica 0 submitted different requests" in r["mismatch_error"] for r in results)
    assert [len(r["episodes"]) for r in results] == [8, 8]  # both ranks of the replica saw every episode
    assert results[0]["episodes"] == results[1]["episodes"]
    assert results[0]["grad_norm"] == pytest.approx(results[1]["grad_norm"], rel=1e-6)


def test_parse_action_and_config_errors():
    from megatron_sdar.rollout import parse_action

    pattern = loop_config().action_pattern
    assert parse_action("<think>x</think><action> go to  desk 1 </action>", pattern) == "go to desk 1"
    assert parse_action("<action>a</action> then <action>b</action>", pattern) == "b"
    assert parse_action("go to desk 1", pattern) is None
    assert parse_action("<action>  </action>", pattern) is None
    assert parse_action("  look \n", None) == "look"
    with pytest.raises(ValueError, match="capture group"):
        loop_config(action_pattern=r"<action>.*</action>")
    with pytest.raises(ValueError, match="not a valid regex"):
        loop_config(action_pattern=r"<action>(")
    with pytest.raises(ValueError, match="overlong"):
        loop_config(overlong="drop")


def test_prompt_that_cannot_fit_ends_the_episode(tmp_path):
    """A prompt over ``max_prompt_tokens`` drops history pairs until it fits; a first turn (no history
    to drop) that does not fit is overlong at once (it used to shrink the window below zero forever,
    which hung a recipe's rollout with the release's long skills in the prompt)."""
    from megatron_sdar.models.tiny import build_tokenizer
    from megatron_sdar.rollout import AgentLoop
    from megatron_sdar.rollout.agent_loop import EpisodeState
    from megatron_sdar.rollout.trajectory import Episode

    tok = build_tokenizer(tmp_path)
    fits = EpisodeState("Room.", "Room.", history=[("go to a", "long observation " * 20), ("look", "ok")])
    probe = AgentLoop(None, tok, loop_config(history_window=2, action_format="text"), None).formatter
    budget = len(probe.encode(probe.messages(probe.user_content(fits, 1))))  # the last pair only
    assert len(probe.encode(probe.messages(probe.user_content(fits, 2)))) > budget
    loop = AgentLoop(None, tok, loop_config(history_window=2, max_prompt_tokens=budget, action_format="text"), None)
    episode = Episode(group=0, task="t", task_type="", seed=0, episode_id=0)
    messages, ids, _ = loop._prompt(fits, episode)
    assert len(ids) == budget and "long observation" not in messages[-1]["content"]
    first = EpisodeState("You are in a room. " * 30, "You are in a room. " * 30)
    assert loop._prompt(first, episode) is None


def test_chat_formatter_history_window_and_context(tmp_path):
    from megatron_sdar.models.tiny import build_tokenizer
    from megatron_sdar.rollout import ChatFormatter
    from megatron_sdar.rollout.agent_loop import EpisodeState

    tok = build_tokenizer(tmp_path)
    fmt = ChatFormatter(tok, loop_config(history_window=2, action_format="text", context_position="start",
                                         restate_task=False))
    state = EpisodeState("Room. Your task is to: heat egg.", "You arrive at fridge 1.", ["look", "open fridge 1"],
                         history=[("go to a", "obs a"), ("go to b", "obs b"), ("go to fridge 1", "You arrive.")])
    text = fmt.user_content(state, 2)
    assert "go to a" not in text and "> go to b\nobs b" in text and "> go to fridge 1" in text
    assert "Admissible actions: look, open fridge 1" in text and text.startswith("Room. Your task")
    assert "Current observation" not in text  # the last history entry shows it
    assert "Current observation: You arrive at fridge 1." in fmt.user_content(state, 0)
    messages = fmt.messages(text)
    teacher = fmt.teacher_messages(messages, "Heat with the microwave.")
    assert teacher[-1]["content"].startswith("Skills that may help:\nHeat with the microwave.")
    assert messages[-1]["content"] == text  # the student's messages are not modified
    ids = fmt.encode(messages)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_index_action_format(tmp_path):
    """Small models may answer with the number of an admissible action; the loop maps it back."""
    from megatron_sdar.models.tiny import build_tokenizer
    from megatron_sdar.rollout import ChatFormatter, parse_action
    from megatron_sdar.rollout.agent_loop import EpisodeState

    config = loop_config(action_format="index", context_position="start", restate_task=False)
    fmt = ChatFormatter(build_tokenizer(tmp_path), config)
    state = EpisodeState("Room. Your task is to: cool egg.", "Room.", ["go to fridge 1", "look"])
    text = fmt.user_content(state, 1)
    assert "1. go to fridge 1\n2. look" in text and "number of your next action" in text
    assert fmt.answer("Look", state) == "<action>2</action>"
    assert fmt.answer("go to desk 1", state) is None  # not admissible: no demonstration
    assert fmt.resolve(parse_action("<action>1</action>", config.action_pattern), state) == "go to fridge 1"
    for bad in ("<action>3</action>", "<action>0</action>", "<action>look</action>", "no tags"):
        assert fmt.resolve(parse_action(bad, config.action_pattern), state) is None
    with pytest.raises(ValueError, match="show_admissible_actions"):
        loop_config(action_format="index", show_admissible_actions=False)


def test_prefix_action_format(tmp_path):
    """A reply may be a word prefix of an admissible action (the first listed one with it is taken);
    demonstrations use the shortest prefix naming their action; a reply that is no prefix is passed
    on as written (the environment rejects it)."""
    from megatron_sdar.models.tiny import build_tokenizer
    from megatron_sdar.rollout import ChatFormatter, parse_action
    from megatron_sdar.rollout.agent_loop import EpisodeState

    config = loop_config(action_format="prefix", context_position="start", restate_task=False)
    fmt = ChatFormatter(build_tokenizer(tmp_path), config)
    admissible = ["go to drawer 1", "go to drawer 2", "go to fridge 1", "take egg 1 from drawer 1", "look"]
    state = EpisodeState("Room. Your task is to: cool egg.", "Room.", admissible)
    assert "Admissible actions: go to drawer 1, go to drawer 2" in fmt.user_content(state, 1)
    assert fmt.answer("go to fridge 1", state) == "<action>go to fridge</action>"
    assert fmt.answer("go to drawer 1", state) == "<action>go to drawer</action>"
    assert fmt.answer("go to drawer 2", state) == "<action>go to drawer 2</action>"
    assert fmt.answer("take egg 1 from drawer 1", state) == "<action>take</action>"
    assert fmt.answer("Look", state) == "<action>look</action>"
    assert fmt.answer("go to desk 1", state) is None
    resolved = {reply: fmt.resolve(parse_action(f"<action>{reply}</action>", config.action_pattern), state)
                for reply in ("take", "TAKE egg", "go to fridge", "go to fridge 1", "go to drawer", "go", "dance")}
    assert resolved == {"take": "take egg 1 from drawer 1", "TAKE egg": "take egg 1 from drawer 1",
                        "go to fridge": "go to fridge 1", "go to fridge 1": "go to fridge 1",
                        "go to drawer": "go to drawer 1", "go": "go to drawer 1", "dance": "dance"}
    assert fmt.resolve(parse_action("no tags", config.action_pattern), state) is None
    with pytest.raises(ValueError, match="show_admissible_actions"):
        loop_config(action_format="prefix", show_admissible_actions=False)


def test_words_action_format(tmp_path):
    """A reply may be an action's first word and some of its other words in order (the first listed
    action holding them is taken); demonstrations use the first word and the shortest tail naming
    their action, so a TWC agent says where, not what ("put drier"); an exact action wins alone."""
    from megatron_sdar.models.tiny import build_tokenizer
    from megatron_sdar.rollout import ChatFormatter, parse_action
    from megatron_sdar.rollout.agent_loop import EpisodeState

    config = loop_config(action_format="words", context_position="start", restate_task=False)
    fmt = ChatFormatter(build_tokenizer(tmp_path), config)
    admissible = ["inventory", "look around", "open clothes drier", "open washing machine",
                  "put wet blue pullover in bench", "put wet blue pullover in laundry basket",
                  "cook red apple in oven", "cook red apple in stove", "cook banana in oven"]
    state = EpisodeState("You are in the laundry room.", "You are in the laundry room.", admissible)
    answers = {a: fmt.answer(a, state) for a in admissible}
    assert answers == {"inventory": "<action>inventory</action>", "look around": "<action>look</action>",
                       "open clothes drier": "<action>open drier</action>",
                       "open washing machine": "<action>open machine</action>",
                       "put wet blue pullover in bench": "<action>put bench</action>",
                       "put wet blue pullover in laundry basket": "<action>put basket</action>",
                       "cook red apple in oven": "<action>cook apple in oven</action>",
                       "cook red apple in stove": "<action>cook stove</action>",
                       "cook banana in oven": "<action>cook banana in oven</action>"}
    assert fmt.answer("put wet blue pullover in shelf", state) is None
    resolved = {reply: fmt.resolve(parse_action(f"<action>{reply}</action>", config.action_pattern), state)
                for reply in ("put basket", "PUT laundry basket", "put", "open drier", "cook oven", "cook banana",
                              "put drier", "drier", "dance")}
    assert resolved == {"put basket": "put wet blue pullover in laundry basket",
                        "PUT laundry basket": "put wet blue pullover in laundry basket",
                        "put": "put wet blue pullover in bench", "open drier": "open clothes drier",
                        "cook oven": "cook red apple in oven", "cook banana": "cook banana in oven",
                        "put drier": "put drier", "drier": "drier", "dance": "dance"}  # no match: as written


def test_context_position(tmp_path):
    """Privileged context goes first, or last before the reply instruction; the student's
    messages never carry it."""
    from megatron_sdar.models.tiny import build_tokenizer
    from megatron_sdar.rollout import ChatFormatter
    from megatron_sdar.rollout.agent_loop import FORMAT_REMINDER, EpisodeState

    state = EpisodeState("Room. Your task is to: cool egg.", "Room.", ["go to fridge 1"])
    tokenizer = build_tokenizer(tmp_path)
    for position in ("start", "end"):
        fmt = ChatFormatter(tokenizer, loop_config(context_position=position, action_format="text", restate_task=False))
        student = fmt.messages(fmt.user_content(state, 1))
        teacher = fmt.teacher_messages(student, "Eggs live in the fridge.")[-1]["content"]
        block = "Skills that may help:\nEggs live in the fridge."
        expected = (block + "\n\n" + student[-1]["content"] if position == "start" else
                    student[-1]["content"].replace("\n\n" + FORMAT_REMINDER, "\n\n" + block + "\n\n" + FORMAT_REMINDER))
        assert teacher == expected and block not in student[-1]["content"]
        assert fmt.messages(fmt.user_content(state, 1), "Eggs live in the fridge.")[-1]["content"] == teacher
    # the restated task stays last, after the context, before the reply instruction
    fmt = ChatFormatter(tokenizer, loop_config(context_position="end", restate_task=True, action_format="text"))
    state.task = "cool egg."
    teacher = fmt.messages(fmt.user_content(state, 1), "Eggs live in the fridge.")[-1]["content"]
    assert teacher.endswith("Skills that may help:\nEggs live in the fridge.\n\nTask: cool egg.\n\n" + FORMAT_REMINDER)
    assert fmt.user_content(state, 1).endswith("go to fridge 1\n\nTask: cool egg.\n\n" + FORMAT_REMINDER)
    with pytest.raises(ValueError, match="context_position"):
        loop_config(context_position="middle")
