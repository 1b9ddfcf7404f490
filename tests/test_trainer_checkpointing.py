"""Training checkpoints: save after 2 optimizer steps, resume in a fresh launch and take the 3rd step
exactly as the uninterrupted run did (loss, weights, random draws), at 1 rank, TP=2 and DP=2 with the
distributed optimizer; model + optimizer resharding to another layout; keep_last pruning, same-step
replacement, corrupt / incomplete / temporary directories, and the errors for what cannot load.

Four launches in all (two saving, two resuming); each world-2 launch re-initializes Megatron's
parallel state between layouts instead of starting new processes (the 2 cores are shared).
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from megatron_sdar.testing import run_distributed

SEQ = 16
LR = 1e-2
# name -> (tp, use_distributed_optimizer, optimizer_sharding)
LAYOUTS = {
    "tp1": (1, False, "dp_reshardable"),
    "tp2": (2, False, "dp_reshardable"),
    "tp2_distopt_full": (2, True, "fully_reshardable"),
    "dp2_distopt": (1, True, "dp_reshardable"),
}
TRAINER_STATE = {"step": 2, "seed": 1234, "skills": {"ucb": {"counts": [3, 1], "values": [0.5, 0.25]}}}


# ----------------------------------------------------------------------------------------------
# worker-side helpers (run inside the gloo ranks)
# ----------------------------------------------------------------------------------------------
def _reinit(tp: int) -> None:
    from megatron.core import parallel_state as ps

    from megatron_sdar.utils.distributed import initialize_megatron_parallel

    if ps.get_tensor_model_parallel_world_size() != tp:
        ps.destroy_model_parallel()
        initialize_megatron_parallel(tp=tp)


def _policy(model_dir: str, distributed: bool, from_hf: bool):
    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.trainer.policy import OptimConfig, build_policy

    arch = QwenArchitecture.from_hf_config(model_dir)
    # warmup makes the learning rate depend on policy.steps_taken, so resuming must restore it
    config = OptimConfig(lr=LR, warmup_steps=4, clip_grad=1.0, use_distributed_optimizer=distributed)
    return build_policy(arch, config, hf_dir=model_dir if from_hf else None)


def _batch(step: int, shards: list[int]):
    """Step ``step``'s tokens for the given data-parallel shards (each rank sees its own)."""
    import torch

    return torch.cat([torch.randint(0, 500, (2, SEQ), generator=torch.Generator().manual_seed(100 * step + s))
                      for s in shards])


def _loss(policy, step: int, shards: list[int]):
    import torch
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_sdar.utils.device import causal_attention_mask

    tokens = _batch(step, shards)
    positions = torch.arange(SEQ)[None].expand(tokens.shape[0], -1)
    logits = policy.model[0](tokens, positions, causal_attention_mask(SEQ))
    return vocab_parallel_cross_entropy(logits[:, :-1].float().contiguous(), tokens[:, 1:]).mean()


def _train_step(policy, step: int, shards: list[int]) -> float:
    policy.zero_grad()
    loss = _loss(policy, step, shards)
    loss.backward()
    assert policy.step().applied
    return loss.item()


def _draws() -> dict:
    import random

    import numpy as np
    import torch

    return {"torch": torch.rand(4).tolist(), "python": random.random(), "numpy": float(np.random.rand())}


def _after_resume(policy, shards: list[int]) -> dict:
    """What must match the uninterrupted run: random draws, the 3rd step, the weights after it."""
    import torch

    draws = _draws()
    loss3 = _train_step(policy, 3, shards)
    with torch.no_grad():
        loss4 = _loss(policy, 4, shards).item()  # the weights after step 3, seen through a forward
    # numpy, not tensors: tensors would travel as shared-memory handles that die with the worker
    weights = {n: p.detach().numpy().copy() for n, p in policy.unwrapped()[0].named_parameters()}
    return {"draws": draws, "loss3": loss3, "loss4": loss4, "weights": weights, "steps_taken": policy.steps_taken}


def _shards() -> list[int]:
    from megatron.core import parallel_state as ps

    return [ps.get_data_parallel_rank()]


def _save_runs(model_dir: str, root: str, names: list[str]) -> dict:
    """Uninterrupted runs: 2 steps, save (for tp1: also after step 1, and step 2 twice), step 3."""
    from megatron_sdar.checkpoint.training import save_checkpoint

    out = {}
    for name in names:
        tp, distributed, sharding = LAYOUTS[name]
        _reinit(tp)
        policy = _policy(model_dir, distributed, from_hf=True)
        losses = []
        for step in (1, 2):
            losses.append(_train_step(policy, step, _shards()))
            if name == "tp1" and step == 1:
                save_checkpoint(Path(root) / name, 1, policy, dict(TRAINER_STATE, step=1), keep_last=2,
                                hf_assets_source=model_dir)
        if name == "tp1":  # replaced below by the same step's second save
            save_checkpoint(Path(root) / name, 2, policy, dict(TRAINER_STATE, attempt=1), keep_last=2)
        save_checkpoint(Path(root) / name, 2, policy, dict(TRAINER_STATE, attempt=2), keep_last=2,
                        optimizer_sharding=sharding, hf_assets_source=model_dir)
        out[name] = dict(_after_resume(policy, _shards()), losses=losses)
    return out


def _resume_runs(root: str, model_dir: str, names: list[str]) -> dict:
    """Fresh policies (random init, other RNG states) load the checkpoint, then take step 3."""
    import random

    import numpy as np
    import torch

    from megatron_sdar.checkpoint.resume import find_latest_checkpoint
    from megatron_sdar.checkpoint.training import load_checkpoint

    out = {}
    for name in names:
        tp, distributed, _ = LAYOUTS[name]
        _reinit(tp)
        torch.manual_seed(999), random.seed(999), np.random.seed(999)
        policy = _policy(model_dir, distributed, from_hf=False)
        trainer_state = load_checkpoint(find_latest_checkpoint(Path(root) / name), policy)
        out[name] = dict(_after_resume(policy, _shards()), trainer_state=trainer_state)
    return out


def _reshard_and_errors(root: str, model_dir: str, bad: dict) -> dict:
    """World 1: the TP=2 and DP=2 checkpoints at TP=1/DP=1 (step 3 on the whole global batch),
    a model-only load as the control, and the errors."""
    import torch

    from megatron_sdar.checkpoint.model import CheckpointFormatError, load_model_checkpoint
    from megatron_sdar.checkpoint.training import IncompatibleCheckpointError, load_checkpoint, save_checkpoint
    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.models.precision import PrecisionSettings
    from megatron_sdar.trainer.policy import OptimConfig, build_policy

    out = {"resume_tp1": _resume_runs(root, model_dir, ["tp1"])["tp1"]}
    for name in ("tp2", "tp2_distopt_full", "dp2_distopt"):
        policy = _policy(model_dir, LAYOUTS[name][1], from_hf=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_checkpoint(Path(root) / name / "step_00000002", policy)
        out[f"reshard_{name}"] = dict(_after_resume(policy, [0, 1] if name == "dp2_distopt" else [0]),
                                      warnings=[str(w.message) for w in caught])
    # control: weights alone (fresh Adam moments) give a visibly different 3rd step
    policy = _policy(model_dir, False, from_hf=False)
    load_model_checkpoint(policy.model, Path(root) / "tp1" / "step_00000002")
    policy.steps_taken = 2
    out["model_only"] = _after_resume(policy, [0])

    errors = {}
    mixed = build_policy(QwenArchitecture.from_hf_config(model_dir), OptimConfig(),
                         precision=PrecisionSettings(dtype="bfloat16"))
    try:  # bf16 on the local spec keeps fp32 norm weights: refused up front, nothing written
        save_checkpoint(Path(root) / "mixed", 1, mixed, {})
        errors["mixed_dtypes"] = None
    except NotImplementedError as exc:
        errors["mixed_dtypes"] = (str(exc), (Path(root) / "mixed").exists())
    for key, (path, distributed) in bad.items():
        try:
            load_checkpoint(path, _policy(model_dir, distributed, from_hf=False))
            errors[key] = None
        except (FileNotFoundError, CheckpointFormatError) as exc:
            errors[key] = (type(exc).__name__, isinstance(exc, IncompatibleCheckpointError), str(exc))
    out["errors"] = errors
    return out


# ----------------------------------------------------------------------------------------------
# fixtures: the four launches
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from megatron_sdar.models.tiny import build_tiny_qwen

    return str(build_tiny_qwen(tmp_path_factory.mktemp("ckpt_model") / "hf", "qwen2", seed=5))


def _fake_complete_checkpoint(path: Path) -> None:
    """A marker-only 'complete' checkpoint of an earlier step, for pruning to delete."""
    from megatron_sdar.checkpoint.model import TRAIN_FORMAT_NAME, TRAIN_FORMAT_VERSION

    path.mkdir(parents=True)
    (path / "complete.json").write_text(json.dumps({"format": TRAIN_FORMAT_NAME, "version": TRAIN_FORMAT_VERSION, "files": {}}))
    (path / "trainer_state.json").write_text("{}")


@pytest.fixture(scope="module")
def saved(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_root")
    _fake_complete_checkpoint(root / "tp1" / "step_00000000")
    (root / "tp1" / ".tmp-step_00000007").mkdir()  # a save killed long ago
    (root / "tp1" / ".tmp-step_00000007" / "junk").write_text("x")
    one = run_distributed(_save_runs, world_size=1, args=(model_dir, str(root), ["tp1"]), timeout=240)
    two = run_distributed(_save_runs, world_size=2, tp=2, timeout=240,
                          args=(model_dir, str(root), ["tp2", "tp2_distopt_full", "dp2_distopt"]))
    return {"root": root, "ranks": {1: one, 2: two}}


@pytest.fixture(scope="module")
def resumed(saved, model_dir, tmp_path_factory):
    root = saved["root"]
    bad_root = tmp_path_factory.mktemp("ckpt_bad")
    # a dp_reshardable distributed-optimizer checkpoint claiming TP=2: must be refused at TP=1
    claims_tp2 = bad_root / "claims_tp2"
    shutil.copytree(root / "dp2_distopt" / "step_00000002", claims_tp2)
    marker = json.loads((claims_tp2 / "complete.json").read_text())
    marker["layout"]["tensor_parallel"] = 2
    (claims_tp2 / "complete.json").write_text(json.dumps(marker))
    incomplete = bad_root / "incomplete"
    shutil.copytree(root / "tp1" / "step_00000002", incomplete)
    (incomplete / "complete.json").unlink()
    bad = {
        "missing": (str(bad_root / "nope"), False),
        "incomplete": (str(incomplete), False),
        "dp_reshardable_tp_change": (str(claims_tp2), True),
        "regular_into_distributed": (str(root / "tp1" / "step_00000002"), True),
        "distributed_into_regular": (str(root / "dp2_distopt" / "step_00000002"), False),
    }
    two = run_distributed(_resume_runs, world_size=2, tp=2, timeout=240,
                          args=(str(root), model_dir, ["tp2", "tp2_distopt_full", "dp2_distopt"]))
    one = run_distributed(_reshard_and_errors, world_size=1, args=(str(root), model_dir, bad), timeout=240)[0]
    return {"ranks2": two, "one": one}


def _max_weight_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float(abs(a[k] - b[k]).max()) for k in a)


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------
@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["tp1", "tp2", "tp2_distopt_full", "dp2_distopt"])
def test_resume_takes_the_same_third_step(saved, resumed, name):
    world = 1 if name == "tp1" else 2
    for rank in range(world):
        before = saved["ranks"][world][rank][name]
        after = resumed["one"]["resume_tp1"] if name == "tp1" else resumed["ranks2"][rank][name]
        assert after["draws"] == before["draws"], (name, rank)  # RNG states restored exactly
        assert abs(after["loss3"] - before["loss3"]) <= 1e-6, (name, rank, after["loss3"], before["loss3"])
        assert abs(after["loss4"] - before["loss4"]) <= 1e-6, (name, rank)
        assert _max_weight_diff(after["weights"], before["weights"]) <= 1e-6, (name, rank)
        assert after["steps_taken"] == before["steps_taken"] == 3
        assert after["trainer_state"] == dict(TRAINER_STATE, attempt=2)
    # the run learned something: the steps moved the loss, so equal losses are not trivially equal
    assert saved["ranks"][world][0][name]["losses"][0] != saved["ranks"][world][0][name]["loss3"]


@pytest.mark.multiproc
def test_model_and_optimizer_reshard_to_one_rank(saved, resumed):
    """TP=2 -> TP=1 (regular optimizer, and distributed optimizer saved fully_reshardable) and
    DP=2 -> DP=1 (distributed optimizer, dp_reshardable): the 3rd step matches the TP=2 / DP=2
    run to float rounding; weights alone with fresh Adam moments do not."""
    one = resumed["one"]
    for name in ("tp2", "tp2_distopt_full", "dp2_distopt"):
        ranks = saved["ranks"][2]
        got = one[f"reshard_{name}"]
        # DP=2 ranks each reported the mean loss of their half of the batch
        expected3 = sum(r[name]["loss3"] for r in ranks) / 2 if name == "dp2_distopt" else ranks[0][name]["loss3"]
        expected4 = sum(r[name]["loss4"] for r in ranks) / 2 if name == "dp2_distopt" else ranks[0][name]["loss4"]
        assert abs(got["loss3"] - expected3) < 1e-5, (name, got["loss3"], expected3)
        assert abs(got["loss4"] - expected4) < 1e-5, (name, got["loss4"], expected4)
        assert got["steps_taken"] == 3
        assert any("RNG states" in w and "not restored" in w for w in got["warnings"]), name
    control = one["model_only"]
    assert abs(control["loss3"] - one["resume_tp1"]["loss3"]) < 1e-6  # same weights before step 3
    assert abs(control["loss4"] - one["resume_tp1"]["loss4"]) > 1e-3  # but Adam's state mattered
    assert control["draws"] != one["resume_tp1"]["draws"]  # and so did restoring the RNG states


@pytest.mark.multiproc
def test_load_errors_are_clear(resumed):
    errors = resumed["one"]["errors"]
    assert errors["missing"][0] == "FileNotFoundError" and "does not exist" in errors["missing"][2]
    assert "not a complete checkpoint: no complete.json" in errors["incomplete"][2]
    kind, incompatible, message = errors["dp_reshardable_tp_change"]
    assert incompatible and "reshards across data-parallel ranks only" in message
    assert "trainer.optimizer_sharding=fully_reshardable" in message and "parallel.tp/pp/cp/ep" in message
    for key, saved in (("regular_into_distributed", "false"), ("distributed_into_regular", "true")):
        assert errors[key][1] and f"parallel.distributed_optimizer and model.dtype (distributed_optimizer={saved}, " \
            "dtype=float32)" in errors[key][2], (key, errors[key][2])
    message, written = errors["mixed_dtypes"]
    assert "mix dtypes (bfloat16, float32" in message and not written


@pytest.mark.multiproc
def test_keep_last_same_step_replacement_and_leftovers(saved):
    root = saved["root"] / "tp1"
    # step 0 (fake) and the stale .tmp- were pruned; step 1 and 2 kept; step 2 is the second save
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002"]
    assert json.loads((root / "step_00000002" / "trainer_state.json").read_text())["attempt"] == 2
    marker = json.loads((root / "step_00000002" / "complete.json").read_text())
    assert marker["step"] == 2 and marker["policy_steps_taken"] == 2 and marker["layout"]["world_size"] == 1
    assert "rng/rank_00000.pt" in marker["files"] and "metadata.json" in marker["files"]
    assert marker["checksum"] == "xxh3_64" and all(len(e["xxh3_64"]) == 16 for e in marker["files"].values())
    assert "hf_assets/tokenizer.json" in marker["files"] and "hf_assets/chat_template.jinja" in marker["files"]
    two = saved["root"] / "dp2_distopt" / "step_00000002"
    assert (two / "rng" / "rank_00001.pt").is_file()
    # the model part reads like a model-only checkpoint (tools/convert_checkpoint.py can export it)
    from megatron_sdar.checkpoint.model import read_checkpoint_model_info

    assert read_checkpoint_model_info(root / "step_00000002").arch.num_layers > 0


@pytest.mark.multiproc
def test_find_latest_skips_corrupt_incomplete_and_temporary(saved, tmp_path):
    from megatron_sdar.checkpoint.resume import find_latest_checkpoint

    root = tmp_path / "run"
    shutil.copytree(saved["root"] / "tp1", root)
    assert find_latest_checkpoint(root) == root / "step_00000002"
    shutil.copytree(root / "step_00000002", root / ".tmp-step_00000009")  # a save in progress
    assert find_latest_checkpoint(root) == root / "step_00000002"

    def latest_with_warning():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            latest = find_latest_checkpoint(root)
        assert any("step_00000002" in str(w.message) for w in caught), [str(w.message) for w in caught]
        return latest, " ".join(str(w.message) for w in caught)

    newest = root / "step_00000002"
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    original = shard.read_bytes()
    shard.write_bytes(original[: len(original) // 2])  # truncated
    latest, message = latest_with_warning()
    assert latest == root / "step_00000001" and "corrupt" in message and shard.name in message
    shard.write_bytes(original)

    marker = (newest / "complete.json").read_text()
    (newest / "complete.json").write_text(marker[:10])  # marker does not parse
    assert latest_with_warning()[0] == root / "step_00000001"
    (newest / "complete.json").unlink()  # interrupted before the marker
    latest, message = latest_with_warning()
    assert latest == root / "step_00000001" and "no complete.json" in message
    (newest / "complete.json").write_text(marker)
    (newest / "trainer_state.json").write_text("{not json")
    assert latest_with_warning()[0] == root / "step_00000001"

    assert find_latest_checkpoint(tmp_path / "never_written") is None
    (tmp_path / "empty").mkdir()
    assert find_latest_checkpoint(tmp_path / "empty") is None


def _skip_bad_checkpoints(model_dir: str, root: str) -> dict:
    """World 1: resume=auto over a same-size corruption of the newest checkpoint, then over a newer
    one whose weights are NaN (valid checksums): each is skipped for the previous one."""
    import torch

    from megatron_sdar.checkpoint.training import load_latest_checkpoint, save_checkpoint

    out = {}
    root = Path(root)
    shard = max((root / "step_00000002").glob("*.distcp"), key=lambda p: p.stat().st_size)
    original = shard.read_bytes()
    data = bytearray(original)
    data[len(data) // 2: len(data) // 2 + 4096] = b"\xff" * 4096
    shard.write_bytes(bytes(data))
    for key in ("corrupt", "corrupt_unverified"):
        policy = _policy(model_dir, False, from_hf=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path, state = load_latest_checkpoint(root, policy, verify=key == "corrupt")
        out[key] = (path.name, state.get("step"), [str(w.message) for w in caught])
    shard.write_bytes(original)

    policy = _policy(model_dir, False, from_hf=True)
    _train_step(policy, 1, [0])  # the optimizer has state to save
    with torch.no_grad():
        next(policy.unwrapped()[0].parameters())[0, 0] = float("nan")
    save_checkpoint(root, 3, policy, dict(TRAINER_STATE, step=3), keep_last=None)
    policy = _policy(model_dir, False, from_hf=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, state = load_latest_checkpoint(root, policy)
    out["nonfinite"] = (path.name, state.get("attempt"), [str(w.message) for w in caught])
    return out


@pytest.mark.multiproc
def test_resume_skips_corrupt_and_nonfinite_checkpoints(saved, model_dir, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(saved["root"] / "tp1", root)
    out = run_distributed(_skip_bad_checkpoints, world_size=1, args=(model_dir, str(root)), timeout=240)[0]
    name, step, messages = out["corrupt"]
    assert (name, step) == ("step_00000001", 1), out["corrupt"]
    assert any("skipping checkpoint" in m and "step_00000002" in m and "does not match its xxh3_64 checksum" in m
               for m in messages), messages
    assert out["corrupt_unverified"][0] == "step_00000002"  # trainer.verify_checkpoints=false: not checked
    name, attempt, messages = out["nonfinite"]
    assert (name, attempt) == ("step_00000002", 2), out["nonfinite"]
    assert any("step_00000003" in m and "non-finite weights" in m for m in messages), messages


@pytest.mark.multiproc
def test_training_checkpoint_exports_a_complete_hf_directory(saved, tmp_path):
    """megatron-to-hf on a training checkpoint, no extra flag: weights, tokenizer and chat template."""
    from transformers import AutoTokenizer

    from tests.test_convert_checkpoint import _run_tool

    out = tmp_path / "export"
    _run_tool("megatron-to-hf", "--ckpt", str(saved["root"] / "tp1" / "step_00000002"), "--out", str(out))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) > 100 and tokenizer.chat_template
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


@pytest.mark.multiproc
def test_the_checkpoint_package_is_one_place_below_the_trainer_and_the_config():
    """Everything about checkpoints is in megatron_sdar/checkpoint/ (nothing left at the old paths),
    and it imports neither the trainer nor the config (config validation imports it)."""
    import subprocess
    import sys

    import megatron_sdar

    root = Path(megatron_sdar.__file__).parent
    for old in ("trainer/checkpointing.py", "models/checkpoint.py", "utils/integrity.py", "utils/rng.py"):
        assert not (root / old).exists(), old
    probe = ("import sys, pkgutil, importlib, megatron_sdar.checkpoint as c\n"
             "for m in pkgutil.iter_modules(c.__path__): importlib.import_module(f'megatron_sdar.checkpoint.{m.name}')\n"
             "print(sorted(m for m in sys.modules if m.startswith(('megatron_sdar.trainer', 'megatron_sdar.config'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=root.parent)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr[-2000:]


def test_optimizer_state_of_another_expert_layout_is_refused_in_one_line():
    """megatron-core 0.19 builds one optimizer per expert group only when ep > 1: a checkpoint of
    an MoE run saved at EP=2 (two optimizers) loaded at EP=1 (one) failed deep inside with
    KeyError 'param_state_sharding_type'; the structure is compared first and refused with the cause."""
    from types import SimpleNamespace

    from megatron_sdar import patches

    single = SimpleNamespace(chained_optimizers=[SimpleNamespace()])
    with pytest.raises(patches.OptimizerLayoutError, match="has 2 optimizer.s. and this layout builds 1: .*parallel.ep > 1"):
        patches.load_optimizer_state(single, {0: {}, 1: {}, "param_state": {}})
    chained = SimpleNamespace(chained_optimizers=[SimpleNamespace(), SimpleNamespace()])
    with pytest.raises(patches.OptimizerLayoutError, match="has 1 optimizer.s. and this layout builds 2"):
        patches.load_optimizer_state(chained, {"optimizer": {}, "param_state": {}, "param_state_sharding_type": "x"})


def _changed_settings_on_resume(model_dir: str, root: str) -> dict:
    """Two steps at lr 1e-2 and the default betas, a checkpoint, then the third step two ways: the
    uninterrupted run with its settings changed in place (lr 4e-3, beta2 0.95, eps 1e-6: the reference
    of "the new values apply from the resumed step, the moments are kept"), and a fresh policy built
    with those settings that loads the checkpoint. Regular and distributed optimizer."""
    from megatron_sdar.checkpoint.training import load_checkpoint, save_checkpoint
    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.trainer.policy import OptimConfig, build_policy

    arch = QwenArchitecture.from_hf_config(model_dir)
    out = {}
    for distributed in (False, True):
        old = OptimConfig(lr=LR, warmup_steps=4, use_distributed_optimizer=distributed)
        new = OptimConfig(lr=4e-3, warmup_steps=4, adam_beta2=0.95, adam_eps=1e-6, use_distributed_optimizer=distributed)
        policy = build_policy(arch, old, hf_dir=model_dir)
        for step in (1, 2):
            _train_step(policy, step, [0])
        path = save_checkpoint(Path(root) / f"changed_{distributed}", 2, policy, {"step": 2})
        policy.optim_config = new  # the uninterrupted run, continued at the new settings
        for group in policy.optimizer.param_groups:
            group.update(betas=(new.adam_beta1, new.adam_beta2), eps=new.adam_eps)
        reference = _after_resume(policy, [0])
        resumed = build_policy(arch, new, hf_dir=None)
        load_checkpoint(path, resumed)
        groups = [{k: g[k] for k in ("betas", "eps", "max_lr")} for g in resumed.optimizer.param_groups]
        out[distributed] = {"reference": reference, "resumed": _after_resume(resumed, [0]), "groups": groups}
    return out


@pytest.mark.multiproc
def test_changed_optimizer_settings_apply_on_resume_with_the_moments_kept(model_dir, tmp_path):
    """Probe B04/B05: a resume at another learning rate failed in megatron-core's parameter-group
    matching ("Could not find parameter group with key (None, 0.0003, ...)"). Now the resumed third
    step equals the uninterrupted run's with the same settings changed in place (the Adam moments
    kept), for the regular and the distributed optimizer."""
    out = run_distributed(_changed_settings_on_resume, world_size=1, args=(model_dir, str(tmp_path)), timeout=240)[0]
    for distributed, result in out.items():
        ref, res = result["reference"], result["resumed"]
        assert abs(ref["loss3"] - res["loss3"]) < 1e-6, distributed
        assert abs(ref["loss4"] - res["loss4"]) < 1e-6, distributed
        assert _max_weight_diff(ref["weights"], res["weights"]) < 1e-6, distributed
        assert all(g == {"betas": (0.9, 0.95), "eps": 1e-6, "max_lr": 4e-3} for g in result["groups"]), result["groups"]
