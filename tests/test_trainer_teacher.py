"""The teacher batch: which samples the teacher scores, and their sequences rendered from the stored
messages with the rollout's chat template (the same ids the engine sees with the skills in the prompt)."""
from __future__ import annotations

import pytest
import torch

from megatron_sdar.algo.objective import preset
from megatron_sdar.trainer.batch import TrainingSample
from megatron_sdar.trainer.teacher import TeacherBatch, teacher_indices


def _samples() -> list[TrainingSample]:
    samples = [TrainingSample(list(range(10 + i, 20 + i)) + [3, 4, 5 + i], 10, [-0.5, -1.0, -1.5],
                              advantage=0.25 * i, episode=i) for i in range(4)]
    samples[3].rl, samples[3].advantage = False, 0.0  # an HDPO rescue turn: distillation only
    for sample in samples[:3]:
        sample.distill = False  # HDPO's ordinary turns: RL only
    return samples


def test_teacher_scores_only_the_samples_a_term_reads():
    samples = _samples()
    assert teacher_indices(samples, preset("grpo")) == []
    assert teacher_indices(samples, preset("sdar")) == [3]  # the distillation sample
    assert teacher_indices(samples, preset("rlsd")) == [0, 1, 2]  # RLSD weights every RL sample's tokens
    for sample in samples:
        sample.rl = sample.distill = True
    assert teacher_indices(samples, preset("sdar")) == [0, 1, 2, 3]
    assert TeacherBatch.build(samples, preset("grpo"), lambda indices: pytest.fail("rendered for GRPO")).indices == []


def test_teacher_sequences_keep_the_response_and_map_back_to_the_step():
    samples = _samples()
    teacher = TeacherBatch.build(samples, preset("rlsd"),
                                 lambda indices: [[7] * (i + 2) + samples[i].input_ids[:10] for i in indices])
    assert teacher.indices == [0, 1, 2]
    for j, i in enumerate(teacher.indices):
        sequence, sample = teacher.sequences[j], samples[i]
        assert sequence.input_ids == [7] * (i + 2) + sample.input_ids
        assert sequence.response_start == i + 2 + 10
        assert sequence.input_ids[sequence.response_start:] == [3, 4, 5 + i]
        assert (sequence.advantage, sequence.rl, sequence.distill) == (sample.advantage, sample.rl, sample.distill)
    assert teacher.num_tokens == sum(len(s.input_ids) + i + 2 for i, s in enumerate(samples[:3]))
    values = {"logprobs": {j: torch.full((3,), float(j)) for j in range(3)}}
    tables = teacher.step_tables(values)
    assert list(tables) == ["teacher_logprobs"]
    assert {i: float(v[0]) for i, v in tables["teacher_logprobs"].items()} == {0: 0.0, 1: 1.0, 2: 2.0}


def test_teacher_prompt_is_rendered_from_the_stored_messages(tmp_path):
    from megatron_sdar.models.tiny import build_tokenizer
    from megatron_sdar.rollout.agent_loop import CONTEXT_HEADER, ChatFormatter
    from tests.configs import loop_config

    tokenizer = build_tokenizer(tmp_path, vocab_size=400, extra_text="pick up the red cup in the kitchen")
    formatter = ChatFormatter(tokenizer, loop_config(context_position="start", action_format="text", restate_task=False))
    messages = formatter.messages("You are in the kitchen. Pick up the cup.")
    prompt = formatter.encode(messages)
    skill = "Cups are kept in the kitchen."
    sample = TrainingSample(prompt + [5, 6], len(prompt), [-1.0, -1.0], messages=messages, privileged_context=skill)
    teacher = TeacherBatch.from_messages([sample], preset("sdar"), formatter)
    (sequence,) = teacher.sequences
    # what the engine is given in a rescue episode: the same messages with the skills in front
    assert sequence.input_ids == formatter.encode(formatter.teacher_messages(messages, skill)) + [5, 6]
    # a step's turns are tokenized as one batch: the same ids as one at a time
    many = [formatter.messages(f"Step {i}: go to the table {i} times.") for i in range(5)]
    assert formatter.encode_many(many) == [formatter.encode(m) for m in many] and formatter.encode_many([]) == []
    text = tokenizer.decode(sequence.input_ids[:sequence.response_start])
    assert CONTEXT_HEADER.strip() in text and skill in text
    assert CONTEXT_HEADER.strip() not in tokenizer.decode(prompt)
    # without stored messages (demonstrations, hand-made samples) there is nothing to render
    with pytest.raises(ValueError, match="no stored messages"):
        TeacherBatch.from_messages([TrainingSample(prompt + [5], len(prompt), [-1.0])], preset("sdar"), formatter)
