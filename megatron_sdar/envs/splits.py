"""Task splits: every environment maps ``train``, ``validation`` and ``test``
(:data:`~megatron_sdar.envs.base.SPLITS`) onto task pools of its own, disjoint by construction.

===========  ================================  ===========================  =================================  ===========================
split        ALFWorld (``json_2.1.1/<dir>/``)   WebShop goal indices         Search-QA questions                TWC / CookingWorld fold
===========  ================================  ===========================  =================================  ===========================
train        ``train``                          ``[1500, n)``                train files, id hash >= 0.1        ``train``
validation   ``valid_unseen``                   ``[500, 1500)``              train files, id hash < 0.1         ``dev``
test         ``valid_seen``                     ``[0, 500)``                 test files                         ``test``
===========  ================================  ===========================  =================================  ===========================

- **ALFWorld**: the directories ``alfworld-download`` writes; a game is its ``game.tw-pddl`` path.
  The SDAR release reports ``valid_seen``: its trainer config (``verl/trainer/config/ppo_trainer.yaml``)
  sets ``env.alfworld.eval_dataset: eval_in_distribution``, which its ALFWorld launchers
  (``examples/sdar_trainer/run_alfworld_*.sh``) do not override, and alfworld reads
  ``eval_in_distribution`` from ``valid_seen``. That is ``test`` here; ``valid_unseen`` (ALFWorld's
  out-of-distribution scenes) is ``validation``. ``make("alfworld", split_dirs={...})`` maps them
  otherwise (three different directories).
- **WebShop**: a goal is its index in the goal list (the WebShop server's ``fixed_<i>`` session). The
  split is the original WebShop's (``baseline_models/env.py`` of princeton-nlp/WebShop: ``test``
  ``range(500)``, ``eval`` ``range(500, 1500)``, ``train`` ``range(1500, len(goals))``; over its
  12,087 human instructions: 500 / 1,000 / 10,587). The SDAR release tests on the same first 500
  goals. A goal list of at most 1,500 goals (the shipped catalog has 10) cannot hold those ranges:
  it is split in WebShop's proportions, the first ``max(1, round(n * 500 / 12087))`` goals
  ``test``, the next ``max(1, round(n * 1000 / 12087))`` ``validation``, the rest ``train``
  (on the shipped catalog: goal 0, goal 1, goals 2-9).
- **TWC, CookingWorld** (TextWorldExpress): the engine's folds, each with its own 1000 generation
  seeds; TWC's folds also hold different objects (``twc_objects.folds.json``), so its test games
  ask about objects no training game has.
- **Search-QA**: Search-R1's layout, which the SDAR release trains and tests on: per dataset a file of
  train questions and a file of test questions (Search-R1 trains on NQ + HotpotQA and tests on NQ,
  TriviaQA, PopQA, HotpotQA, 2WikiMultihopQA, MuSiQue, Bamboogle). A question is its ``id``
  (``<data_source>/<id>`` when the row names its ``data_source``); an id in both a train and a test
  file is refused. Search-R1 has no validation split: ``validation`` is the train questions whose id
  hashes (SHA-256) below :data:`SEARCH_VALIDATION_SHARE`, a fixed slice that does not move when
  questions are added, removed or reordered; ``train`` is the other train questions.

Which splits a run draws: SFT and RL ``train``, evaluation ``trainer.eval_split`` (``test`` by
default, ``validation`` for ``tools/sweep.py``); the trainer derives them from the task seeds
(:func:`megatron_sdar.trainer.seeds.split_of`). :func:`data_problem` is the configuration check of
an environment's data for those splits.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable

from megatron_sdar.envs.base import SPLITS, EnvError

# ---------------------------------------------------------------------------------------- ALFWorld
#: ALFWorld's directories (json_2.1.1/<dir>) as our splits
ALFWORLD_SPLIT_DIRS = {"train": "train", "validation": "valid_unseen", "test": "valid_seen"}
ALFWORLD_DIRS = ("train", "valid_seen", "valid_unseen")


def alfworld_split_dirs(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """:data:`ALFWORLD_SPLIT_DIRS` with ``overrides`` (split -> directory); the three directories must
    differ, so the splits cannot share a game."""
    dirs = dict(ALFWORLD_SPLIT_DIRS)
    for split, name in (overrides or {}).items():
        if split not in SPLITS:
            raise ValueError(f"alfworld split_dirs: {split!r} is not a split ({', '.join(SPLITS)})")
        if name not in ALFWORLD_DIRS:
            raise ValueError(f"alfworld split_dirs: {split}={name!r} is not one of {', '.join(ALFWORLD_DIRS)}")
        dirs[split] = name
    if len(set(dirs.values())) != len(dirs):
        raise ValueError(f"alfworld split_dirs: the splits must read different directories, got {dirs}")
    return dirs


# ----------------------------------------------------------------------------------------- WebShop
WEBSHOP_TEST_GOALS = 500  # WebShop's test goals: range(500)
WEBSHOP_VALIDATION_GOALS = 1000  # its "eval" goals: range(500, 1500)
WEBSHOP_GOALS = 12087  # its human instructions (the full goal list the ranges were cut from)


def webshop_goal_ranges(num_goals: int) -> dict[str, range]:
    """Goal indices of each split for a goal list of ``num_goals`` (see the module docstring)."""
    fixed_end = WEBSHOP_TEST_GOALS + WEBSHOP_VALIDATION_GOALS
    if num_goals > fixed_end:
        test, validation = WEBSHOP_TEST_GOALS, WEBSHOP_VALIDATION_GOALS
    else:
        test = max(1, round(num_goals * WEBSHOP_TEST_GOALS / WEBSHOP_GOALS))
        validation = max(1, round(num_goals * WEBSHOP_VALIDATION_GOALS / WEBSHOP_GOALS))
        if num_goals - test - validation < 1:
            raise EnvError(f"webshop: {num_goals} goals cannot be split into train, validation and test "
                           "(at least 3 are needed)")
    return {"test": range(0, test), "validation": range(test, test + validation),
            "train": range(test + validation, num_goals)}


# --------------------------------------------------------------------------------------- Search-QA
SEARCH_VALIDATION_SHARE = 0.1


def search_question_key(row: dict[str, Any]) -> str:
    """A question's identity: ``<data_source>/<id>``, or ``<id>`` when the row names no data source."""
    qid = str(row["id"])
    return f"{row['data_source']}/{qid}" if row.get("data_source") else qid


def search_train_split(key: str) -> str:
    """``validation`` for the train questions whose key hashes below :data:`SEARCH_VALIDATION_SHARE`,
    else ``train``."""
    value = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    return "validation" if value < SEARCH_VALIDATION_SHARE else "train"


def as_paths(value: str | Path | Iterable[str | Path] | None, default: Path) -> list[Path]:
    """One path or a list of paths (one file per dataset); ``default`` when None."""
    if value is None:
        return [default]
    if isinstance(value, (str, Path)):
        return [Path(os.path.expandvars(str(value))).expanduser()]
    paths = [Path(os.path.expandvars(str(v))).expanduser() for v in value]
    if not paths:
        raise ValueError("an empty list of question files")
    return paths


# ---------------------------------------------------------------------------- configuration check
def data_problem(env_name: str, kwargs: dict[str, Any], splits: Iterable[str]) -> str | None:
    """What is missing of the data ``make(env_name, **kwargs)`` reads for ``splits``: one line naming
    the file or directory, or None. Only data that is given is checked (``kwargs`` paths, or
    ``$ALFWORLD_DATA`` for ALFWorld); the shipped samples are the defaults."""
    splits = sorted(set(splits))
    if env_name in ("twc", "cookingworld"):  # the engine ships its games; it needs the package and Java
        from megatron_sdar.envs.textworld_express import missing_dependency

        problem = missing_dependency()
        return f"{env_name}: {problem}" if problem else None
    if env_name == "alfworld":
        data_dir = kwargs.get("data_dir")
        if data_dir == "builtin":
            return None
        if data_dir is None:
            data_dir = os.environ.get("ALFWORLD_DATA")
            where = "$ALFWORLD_DATA"
            if not data_dir:
                return None
        else:
            where = "env.kwargs.data_dir"
        root = Path(os.path.expandvars(str(data_dir))).expanduser()
        try:
            dirs = alfworld_split_dirs(kwargs.get("split_dirs"))
        except ValueError as exc:
            return str(exc)
        for split in splits:
            split_dir = root / "json_2.1.1" / dirs[split]
            if not split_dir.is_dir():
                return (f"alfworld: {where}={data_dir}: the {split} split's directory {split_dir} does not exist "
                        "(run `alfworld-download`)")
            if next(iter(split_dir.rglob("game.tw-pddl")), None) is None:
                return f"alfworld: {where}={data_dir}: the {split} split's directory {split_dir} holds no game.tw-pddl"
        return None
    if env_name == "webshop":
        catalog = kwargs.get("catalog_path")
        if catalog is not None and "base_url" not in kwargs and not Path(catalog).expanduser().is_file():
            return f"webshop: env.kwargs.catalog_path={catalog} does not exist"
        return None
    if env_name == "search":  # the environment reads the train and the test files (it refuses a shared question)
        for name in ("train_questions", "test_questions"):
            if kwargs.get(name) is None:
                continue
            try:
                paths = as_paths(kwargs[name], Path())
            except ValueError as exc:
                return f"search: env.kwargs.{name}: {exc}"
            for path in paths:
                if not path.is_file():
                    return f"search: env.kwargs.{name}: {path} does not exist"
        corpus = kwargs.get("corpus_path")
        if corpus is not None and not kwargs.get("retriever_url") and not Path(corpus).expanduser().is_file():
            return f"search: env.kwargs.corpus_path={corpus} does not exist"
        return None
    return None
