"""HDPO end to end on the built-in world: the trainer (tiny model, real vLLM engine, household) finds
the cliff groups of a rollout, replays them with the skills in the prompt through the engine, and
turns only the successful replays into distillation samples; the step's metrics count the rescue
episodes as work but not as success."""
import pytest

from megatron_sdar.testing import TINY_RUN_OVERRIDES, run_distributed


def _hdpo_trainer_checks(out: str):
    import torch
    from megatron_sdar.config.schema import compose_run
    from megatron_sdar.rollout.agent_loop import CONTEXT_HEADER
    from megatron_sdar.trainer import seeds as task_seeds
    from megatron_sdar.trainer.batch import rescue_samples
    from megatron_sdar.trainer.loop import SDARTrainer
    from megatron_sdar.trainer.teacher import TeacherBatch

    overrides = [*TINY_RUN_OVERRIDES, "algo=hdpo", "trainer.sft_steps=0", "trainer.eval_tasks=0",
                 "rollout.tasks_per_step=2", "rollout.group_size=2", "env.max_turns=2", f"trainer.output_dir={out}"]
    run = compose_run(overrides)
    trainer = SDARTrainer(run)
    import contextlib
    import io

    from megatron_sdar.utils.logging import log

    with contextlib.redirect_stdout(io.StringIO()) as line:
        log("built")
    result = {"log_line": line.getvalue()}  # the trainer's lines name the preset that runs
    try:
        trainer.sync_weights()
        seeds = task_seeds.train_seeds(run.trainer.seed, 0, 2)
        batch = trainer.rollout(seeds, temperature=1.0, with_skills=True, group_size=2, first_episode_id=0)
        cliffs = batch.cliff_groups()
        result["cliffs"] = cliffs
        result["cliffs_by_hand"] = sorted({e.group for e in batch.episodes} -
                                          {e.group for e in batch.episodes if e.won})
        before = [p.detach().clone() for p in trainer.policy.model[0].parameters()]
        rescue = trainer.rescue(batch, seeds, step=0)
        result["unchanged"] = all(torch.equal(a, p.detach()) for a, p in zip(before, trainer.policy.model[0].parameters()))
        result["rescue_episodes"] = len(rescue.episodes)
        context_of = {e.group: e.privileged_context for e in batch.episodes}
        result["same_skills"] = all(e.privileged_context == context_of[cliffs[e.group]] and e.privileged_context
                                    for e in rescue.episodes)
        decode = trainer.tokenizer.decode
        flipped = rescue_samples(type(rescue)([type(e)(**{**e.__dict__, "won": True}) for e in rescue.episodes]))
        # the teacher batch renders each rescue turn's prompt from its stored messages and skills
        teacher = TeacherBatch.from_messages(flipped, trainer.objective, trainer.formatter)
        result["teacher_scores_every_rescue_turn"] = teacher.indices == list(range(len(flipped)))
        result["teacher_prompt_has_skills"] = all(
            CONTEXT_HEADER.strip() in decode(s.input_ids[:s.response_start]) for s in teacher.sequences)
        result["student_prompt_has_none"] = all(
            CONTEXT_HEADER.strip() not in decode(s.input_ids[:s.response_start]) for s in flipped)
        # the engine generated from the teacher's prompt: its log-probs are the trainer's on the
        # rendered teacher sequence (so the rendering is the prompt the engine saw), not on the
        # student's (same weights)
        for name, sequences in (("teacher", teacher.sequences), ("student", flipped)):
            scored = trainer.updater._forward_values(trainer.policy.model, sequences)["logprobs"]
            result[f"{name}_diff"] = max(float((scored[i] - torch.tensor(s.rollout_logprobs)).abs().max())
                                         for i, s in enumerate(sequences))
        # only successful rescues become (distillation-only) samples
        natural = rescue_samples(rescue)
        result["natural"] = (len(natural), sum(len([t for t in e.turns if t.response_ids])
                                               for e in rescue.episodes if e.won))
        result["won_rescues"] = sum(e.won for e in rescue.episodes)
        rescue.episodes[0].won = True
        for episode in rescue.episodes[1:]:
            episode.won = False
        picked = rescue_samples(rescue)
        first = [t for t in rescue.episodes[0].turns if t.response_ids]
        result["picked"] = (len(picked), len(first),
                            all(s.input_ids == t.prompt_ids + t.response_ids for s, t in zip(picked, first)),
                            all(not s.rl and s.distill and s.advantage == 0.0 for s in picked))

        metrics = trainer.iteration(0)  # the same rollout again (same seeds and weights), then the update
        result["metrics"] = {k: v for k, v in metrics.items() if k.startswith(("hdpo/", "rollout/"))}
        result["batch_summary"] = batch.summary()
    finally:
        trainer.close()
    return result


@pytest.mark.multiproc
def test_hdpo_rescues_cliff_groups_through_the_engine(tmp_path):
    result = run_distributed(_hdpo_trainer_checks, world_size=1, args=(str(tmp_path / "hdpo"),), init="process_group",
                             timeout=600)[0]
    assert result["log_line"] == "[hdpo] built\n"
    assert result["cliffs"] == result["cliffs_by_hand"] and result["cliffs"], result["cliffs"]  # untrained: all fail
    assert result["rescue_episodes"] == 2 * len(result["cliffs"]) and result["unchanged"]
    assert result["same_skills"] and result["teacher_prompt_has_skills"] and result["student_prompt_has_none"]
    assert result["teacher_scores_every_rescue_turn"]
    assert result["teacher_diff"] < 1e-3 < result["student_diff"], (result["teacher_diff"], result["student_diff"])
    assert result["natural"][0] == result["natural"][1]
    count, turns, same_tokens, distill_only = result["picked"]
    assert count == turns > 0 and same_tokens and distill_only
    m, summary = result["metrics"], result["batch_summary"]
    assert m["hdpo/cliff_groups"] == len(result["cliffs"]) and m["hdpo/rescue_episodes"] == result["rescue_episodes"]
    assert m["rollout/episodes"] == summary["rollout/episodes"] + result["rescue_episodes"]
    assert m["rollout/success_rate"] == summary["rollout/success_rate"]  # rescues are not the step's success
    assert m["hdpo/rescued"] == result["won_rescues"]  # the same rollout and rescue as above
    print({k: result[k] for k in ("teacher_diff", "student_diff", "won_rescues", "cliffs")})
