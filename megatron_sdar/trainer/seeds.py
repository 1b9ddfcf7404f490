"""Task seeds of a run, and the split each one draws its task from.

    task seed = kind * 2**40 + trainer_seed * 2**30 + index      (index < 2**30, trainer_seed < 2**10)

so two kinds, or two trainer seeds of the same kind, can never give the same seed. The kind also
names the split the environment draws the seed's task from (:func:`split_of`, the one place that
maps them): test seeds draw ``test`` tasks, validation seeds ``validation`` tasks, SFT, training and
tokenizer-corpus seeds ``train`` tasks. Each environment's splits are disjoint task pools
(:mod:`megatron_sdar.envs.splits`: ALFWorld's directories, WebShop's goal ranges, Search-QA's
question files), so test, validation and training tasks never meet, whatever ``trainer.seed`` is;
SFT demonstrations and RL tasks both come from ``train``. The household world generates each task
from its seed, so there the kinds' seeds alone keep every kind apart.

The two evaluation splits do not depend on ``trainer.seed``: every run of a comparison is scored on
the same held-out tasks. Hyperparameters are chosen on ``validation`` tasks (``tools/sweep.py``);
``test`` tasks are what a run reports (``trainer.eval_split``, default ``test``).
"""
from __future__ import annotations

from megatron_sdar.envs.base import SPLITS

TEST, SFT, TRAIN, CORPUS, VALIDATION = 0, 1, 2, 3, 4
EVAL_SPLITS = {"test": TEST, "validation": VALIDATION}
#: the split (megatron_sdar.envs.base.SPLITS) each kind of seed draws its task from
SPLIT_OF_KIND = {TEST: "test", VALIDATION: "validation", SFT: "train", TRAIN: "train", CORPUS: "train"}
assert set(SPLIT_OF_KIND.values()) == set(SPLITS)
assert all(SPLIT_OF_KIND[kind] == split for split, kind in EVAL_SPLITS.items())
_INDEX_BITS, _SEED_BITS = 30, 10


def task_seed(kind: int, index: int, trainer_seed: int = 0) -> int:
    if not 0 <= index < 2**_INDEX_BITS:
        raise ValueError(f"task index {index} is outside [0, 2**{_INDEX_BITS})")
    if not 0 <= trainer_seed < 2**_SEED_BITS:
        raise ValueError(f"trainer.seed={trainer_seed} is outside [0, {2**_SEED_BITS})")
    return (kind << (_INDEX_BITS + _SEED_BITS)) + (trainer_seed << _INDEX_BITS) + index


def split_of(task_seed: int) -> str:
    """The split (``train``, ``validation``, ``test``) that ``task_seed``'s task is drawn from."""
    kind = task_seed >> (_INDEX_BITS + _SEED_BITS)
    if task_seed < 0 or kind not in SPLIT_OF_KIND:
        raise ValueError(f"task seed {task_seed} is not of the seed layout (kinds {sorted(SPLIT_OF_KIND)})")
    return SPLIT_OF_KIND[kind]


def eval_seeds(num_tasks: int, split: str = "test") -> list[int]:
    """The first ``num_tasks`` tasks of an evaluation split (``test`` or ``validation``)."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"evaluation split must be one of {sorted(EVAL_SPLITS)}, got {split!r}")
    return [task_seed(EVAL_SPLITS[split], i) for i in range(num_tasks)]


def sft_seeds(trainer_seed: int, num_episodes: int) -> list[int]:
    return [task_seed(SFT, i, trainer_seed) for i in range(num_episodes)]


def train_seeds(trainer_seed: int, step: int, tasks_per_step: int) -> list[int]:
    return [task_seed(TRAIN, step * tasks_per_step + i, trainer_seed) for i in range(tasks_per_step)]


def corpus_seeds(num_episodes: int) -> list[int]:
    return [task_seed(CORPUS, i) for i in range(num_episodes)]
