"""Convert Qwen2 / Qwen2.5 / Qwen3 checkpoints between Hugging Face and Megatron-Core.

    # HF -> Megatron distributed checkpoint (loadable at any TP/PP later)
    bash tools/run.sh tools/convert_checkpoint.py hf-to-megatron --hf HF_DIR --out CKPT_DIR
    bash tools/run.sh -m torch.distributed.run --nproc-per-node 4 tools/convert_checkpoint.py hf-to-megatron \
        --hf HF_DIR --out CKPT_DIR --tp 2 --pp 2

    # Megatron distributed checkpoint -> HF directory (safetensors, config, tokenizer)
    bash tools/run.sh tools/convert_checkpoint.py megatron-to-hf --ckpt CKPT_DIR --out HF_DIR [--hf-config HF_SOURCE_DIR]
    bash tools/run.sh -m torch.distributed.run --nproc-per-node 2 tools/convert_checkpoint.py megatron-to-hf \
        --ckpt CKPT_DIR --out HF_DIR --tp 2

(``tools/run.sh`` runs the environment's python with this checkout importable; any python that can
import ``megatron_sdar`` will do.) Each rank reads only the parts of the input it owns; the HF export
streams one tensor at a time to rank 0, which writes it in place into pre-laid-out safetensors
shards. ``--tp`` defaults to WORLD_SIZE / pp. Paths and the checkpoint's description are checked
before a model is built. The libraries' warnings (Transformer Engine / Apex fallbacks, deprecations)
are not shown.

Safety: the output is written into a temporary sibling directory and renamed into place at the
end, so a failed conversion leaves an existing output as it was; ``--force`` replaces a non-empty
output but never one that contains the input or lies inside it. A checkpoint written by
megatron-sdar is verified first (every file against the checksum in its ``complete.json``; the
loaded weights for NaN/inf), ``--no-verify`` skips that. An export needs the model's tokenizer
(carried by megatron-sdar checkpoints, or from ``--hf-config``), ``--no-tokenizer`` writes one
without. Every user error exits with code 2 and one line.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

# Libraries whose import-time and build-time notices (Transformer Engine / Apex fallbacks, deprecations,
# torch's "No CUDA runtime is found") say nothing a user of this tool can act on.
QUIET_LIBRARIES = r"(megatron|torch|transformer_engine|apex)(\.|$)"


class UsageError(Exception):
    """A user error: printed as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_mcore = sub.add_parser("hf-to-megatron", help="HF directory -> Megatron distributed checkpoint")
    to_mcore.add_argument("--hf", required=True, type=Path, help="HF model directory (config.json + safetensors)")
    to_mcore.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    to_hf = sub.add_parser("megatron-to-hf", help="Megatron distributed checkpoint -> HF directory")
    to_hf.add_argument("--ckpt", required=True, type=Path, help="Megatron distributed checkpoint directory")
    to_hf.add_argument("--out", required=True, type=Path, help="output HF directory")
    to_hf.add_argument("--hf-config", type=Path, default=None,
                       help="HF directory whose config.json / tokenizer / generation config to use "
                            "(required for checkpoints not written by megatron-sdar)")
    to_hf.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                       help="dtype of the written safetensors (default: the checkpoint's)")
    to_hf.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors file")
    to_hf.add_argument("--no-verify", action="store_true",
                       help="skip the checksum and finite-weight checks of the checkpoint")
    to_hf.add_argument("--no-tokenizer", action="store_true",
                       help="write the export even though no tokenizer is known for it")
    for p in (to_mcore, to_hf):
        p.add_argument("--tp", type=int, default=None, help="tensor parallel size (default WORLD_SIZE/pp)")
        p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
        p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _nested(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _check_output(out: Path, force: bool, inputs: list[Path | None]) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    for src in inputs:
        if src is not None and _nested(out, src):
            raise UsageError(f"--out {out} and the input {src} contain one another; --force would delete the "
                             "input: choose an output directory outside it")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {out} is not empty (pass --force to replace its contents)")


def _check_inputs(args: argparse.Namespace) -> None:
    """Fail fast, before torch/megatron are imported, on missing or wrong directories."""
    from megatron_sdar.models.architecture import QwenArchitecture, UnsupportedConfigError
    from megatron_sdar.checkpoint.model import (CheckpointFormatError, has_tokenizer, read_checkpoint_model_info,
                                                resolve_checkpoint_dir)

    if args.pp < 1 or (args.tp is not None and args.tp < 1):
        raise UsageError("--tp and --pp must be >= 1")
    if args.command == "hf-to-megatron":
        if not args.hf.is_dir():
            raise UsageError(f"--hf {args.hf} is not a directory")
        if not (args.hf / "config.json").is_file():
            raise UsageError(f"--hf {args.hf} has no config.json (not a Hugging Face model directory)")
        if not any(args.hf.glob("*.safetensors")):
            raise UsageError(f"--hf {args.hf} has no *.safetensors weights")
        try:
            QwenArchitecture.from_hf_config(args.hf)
        except (UnsupportedConfigError, ValueError) as exc:
            raise UsageError(f"--hf {args.hf}: {exc}") from None
        from megatron_sdar.models.hf_loader import check_safetensors_files

        try:  # headers and sizes, before a model is built
            check_safetensors_files(args.hf)
        except ValueError as exc:
            raise UsageError(f"--hf: {exc}") from None
        _check_output(args.out, args.force, [args.hf])
        return
    if not args.ckpt.is_dir():
        raise UsageError(f"--ckpt {args.ckpt} is not a directory")
    try:
        args.ckpt = resolve_checkpoint_dir(args.ckpt)
    except CheckpointFormatError as exc:
        raise UsageError(f"--ckpt: {exc}") from None
    if args.hf_config is not None and not (args.hf_config / "config.json").is_file():
        raise UsageError(f"--hf-config {args.hf_config} has no config.json")
    try:  # the checkpoint's model and --hf-config must agree
        args.info = read_checkpoint_model_info(args.ckpt, args.hf_config)
    except (CheckpointFormatError, UnsupportedConfigError) as exc:
        raise UsageError(str(exc)) from None
    if not has_tokenizer(args.info.assets_dir) and not args.no_tokenizer:
        raise UsageError(f"no tokenizer for {args.ckpt} (it carries none): pass --hf-config DIR with the model's "
                         "tokenizer, or --no-tokenizer to export the weights without one")
    _check_output(args.out, args.force, [args.ckpt, args.hf_config])


def _setup_parallel(args) -> None:
    from megatron_sdar.utils.distributed import init_process_group, initialize_megatron_parallel

    init_process_group()
    import torch.distributed as dist

    world = dist.get_world_size()
    tp = args.tp if args.tp is not None else max(1, world // args.pp)
    if world % (tp * args.pp):
        raise UsageError(f"world size {world} is not divisible by tp*pp = {tp}*{args.pp}")
    args.tp = tp
    initialize_megatron_parallel(tp=tp, pp=args.pp)


def _staging_dir(out: Path) -> Path:
    return out.resolve().parent / f".{out.resolve().name}.converting"


def _prepare_staging(out: Path) -> Path:
    """Rank 0 creates an empty staging directory beside ``out``; everyone waits."""
    import torch.distributed as dist

    staging = _staging_dir(out)
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a conversion that died
        staging.mkdir(parents=True)
    dist.barrier()
    return staging


def _publish(out: Path) -> None:
    """Rank 0 moves the finished staging directory into place (``--force``: replacing ``out``)."""
    import torch.distributed as dist

    dist.barrier()
    if dist.get_rank() == 0:
        staging, out = _staging_dir(out), out.resolve()
        replaced = out.parent / f".{out.name}.replaced"
        if out.exists():
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(out, replaced)
        os.rename(staging, out)
        shutil.rmtree(replaced, ignore_errors=True)
    dist.barrier()


def _all_ranks(fn, *args):
    """Run ``fn`` on every rank; if it fails on any rank, raise :class:`UsageError` on all of them
    (a rank failing alone must not leave the others waiting in the next collective)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    error = None
    try:
        result = fn(*args)
    except CheckpointException as exc:  # torch wraps each rank's failure; report the first one
        cause = next(iter(exc.failures.values()), exc)  # (exception, traceback frames)
        cause = cause[0] if isinstance(cause, tuple) else cause
        error, result = f"{type(cause).__name__}: {cause}".splitlines()[0], None
    except Exception as exc:  # noqa: BLE001 - reported as one line below
        error, result = f"{type(exc).__name__}: {exc}".splitlines()[0], None
    errors: list = [error]
    if dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    failed = [e for e in errors if e is not None]
    if failed:
        raise UsageError(f"could not read the checkpoint: {failed[0]}")
    return result


def hf_to_megatron(args) -> None:
    import torch.distributed as dist

    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.checkpoint.model import save_model_checkpoint
    from megatron_sdar.models.hf_loader import load_hf_weights
    from megatron_sdar.models.megatron_model import build_model

    arch = QwenArchitecture.from_hf_config(args.hf)
    arch.check_tensor_parallel(args.tp)
    staging = _prepare_staging(args.out)
    model = build_model(arch, initialize_weights=False)
    show = dist.get_rank() == 0 and not args.no_progress
    load_hf_weights(model, arch, args.hf, progress=show)
    if show:
        print(f"saving Megatron distributed checkpoint (tp={args.tp}, pp={args.pp}) to {args.out}", flush=True)
    save_model_checkpoint(model, arch, staging, hf_assets_source=args.hf)
    _publish(args.out)


def megatron_to_hf(args) -> None:
    import torch
    import torch.distributed as dist

    from megatron_sdar.checkpoint.integrity import MARKER_FILE
    from megatron_sdar.checkpoint.model import (CheckpointFormatError, load_model_checkpoint, nonfinite_parameters,
                                                verify_checkpoint)
    from megatron_sdar.models.hf_export import export_hf
    from megatron_sdar.models.megatron_model import build_model

    info = args.info
    arch = info.arch
    arch.check_tensor_parallel(args.tp)
    if not args.no_verify:
        if (args.ckpt / MARKER_FILE).is_file() or info.written_by_us:
            try:
                verify_checkpoint(args.ckpt)
            except CheckpointFormatError as exc:
                raise UsageError(f"{exc}; pass --no-verify to convert it anyway") from None
        elif dist.get_rank() == 0:
            print(f"warning: {args.ckpt} has no {MARKER_FILE} (not written by megatron-sdar): "
                  "its files cannot be verified", file=sys.stderr, flush=True)
    model = build_model(arch, initialize_weights=False)
    _all_ranks(load_model_checkpoint, model, args.ckpt)
    if not args.no_verify and (bad := nonfinite_parameters(model)):
        raise UsageError(f"{args.ckpt} holds non-finite weights (NaN/inf in {len(bad)} parameter(s), e.g. {bad[0]}); "
                         "pass --no-verify to export them anyway")
    staging = _prepare_staging(args.out)
    dtype = getattr(torch, args.dtype) if args.dtype else arch.torch_dtype_object()
    export_hf(model, arch, staging, dtype=dtype, assets_dir=info.assets_dir,
              max_shard_bytes=int(args.max_shard_size * 1024**3), progress=not args.no_progress)
    _publish(args.out)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def quiet_libraries():
    """Within: the libraries' Python warnings (:data:`QUIET_LIBRARIES`) are ignored and log records
    below ERROR are dropped, so that the tool's output is its own (an error: one line on stderr)."""
    previous = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=QUIET_LIBRARIES)
        # torch's deprecation of the ShardedTensor that megatron's checkpoints use (raised through our CPU shim)
        warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with quiet_libraries():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    start = time.monotonic()
    try:
        _check_inputs(args)
        _setup_parallel(args)
        from megatron_sdar.utils.distributed import destroy

        try:
            hf_to_megatron(args) if args.command == "hf-to-megatron" else megatron_to_hf(args)
        except BaseException:
            if _rank() == 0:
                shutil.rmtree(_staging_dir(args.out), ignore_errors=True)  # the old output stays as it was
            raise
        finally:
            destroy()
    except UsageError as exc:
        if _rank() == 0:
            print(f"convert_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    if _rank() == 0:
        print(f"{args.command}: wrote {args.out} in {time.monotonic() - start:.1f}s", flush=True)
    return 0


if __name__ == "__main__":  # required: dist_checkpointing starts helper processes with spawn
    sys.exit(main())
