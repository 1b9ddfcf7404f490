"""Convert Qwen2 / Qwen2.5 / Qwen3 checkpoints between Hugging Face and Megatron-Core.

    # HF -> Megatron distributed checkpoint (loadable at any TP/PP later)
    python tools/convert_checkpoint.py hf-to-megatron --hf HF_DIR --out CKPT_DIR
    torchrun --nproc-per-node 4 tools/convert_checkpoint.py hf-to-megatron --hf HF_DIR --out CKPT_DIR --tp 2 --pp 2

    # Megatron distributed checkpoint -> HF directory (safetensors, config, tokenizer)
    python tools/convert_checkpoint.py megatron-to-hf --ckpt CKPT_DIR --out HF_DIR [--hf-config HF_SOURCE_DIR]
    torchrun --nproc-per-node 2 tools/convert_checkpoint.py megatron-to-hf --ckpt CKPT_DIR --out HF_DIR --tp 2

Each rank reads only the parts of the input it owns; the HF export streams one tensor at a time
to rank 0, which writes it in place into pre-laid-out safetensors shards. ``--tp`` defaults to
WORLD_SIZE / pp. Paths are checked before anything heavy is imported.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
    for p in (to_mcore, to_hf):
        p.add_argument("--tp", type=int, default=None, help="tensor parallel size (default WORLD_SIZE/pp)")
        p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
        p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _check_output(parser: argparse.ArgumentParser, out: Path, force: bool, inputs: list[Path]) -> None:
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a directory")
    for src in inputs:
        if src is not None and out.resolve() == src.resolve():
            parser.error(f"--out {out} is the input directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        parser.error(f"--out {out} is not empty (pass --force to replace its contents)")


def _check_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fail fast, before torch/megatron are imported, on missing or wrong directories."""
    if args.command == "hf-to-megatron":
        if not args.hf.is_dir():
            parser.error(f"--hf {args.hf} is not a directory")
        if not (args.hf / "config.json").is_file():
            parser.error(f"--hf {args.hf} has no config.json (not a Hugging Face model directory)")
        if not any(args.hf.glob("*.safetensors")):
            parser.error(f"--hf {args.hf} has no *.safetensors weights")
        from megatron_sdar.models.architecture import QwenArchitecture, UnsupportedConfigError

        try:
            QwenArchitecture.from_hf_config(args.hf)
        except UnsupportedConfigError as exc:
            parser.error(f"--hf {args.hf}: {exc}")
        _check_output(parser, args.out, args.force, [args.hf])
    else:
        if not args.ckpt.is_dir():
            parser.error(f"--ckpt {args.ckpt} is not a directory")
        from megatron_sdar.models.checkpoint import CheckpointFormatError, resolve_checkpoint_dir

        try:
            resolve_checkpoint_dir(args.ckpt)
        except CheckpointFormatError as exc:
            parser.error(f"--ckpt: {exc}")
        if args.hf_config is not None and not (args.hf_config / "config.json").is_file():
            parser.error(f"--hf-config {args.hf_config} has no config.json")
        from megatron_sdar.models.architecture import UnsupportedConfigError
        from megatron_sdar.models.checkpoint import read_checkpoint_model_info

        try:  # the checkpoint's model and --hf-config must agree
            read_checkpoint_model_info(args.ckpt, args.hf_config)
        except (CheckpointFormatError, UnsupportedConfigError) as exc:
            parser.error(str(exc))
        _check_output(parser, args.out, args.force, [args.ckpt, args.hf_config])
    if args.pp < 1 or (args.tp is not None and args.tp < 1):
        parser.error("--tp and --pp must be >= 1")


def _setup_parallel(args) -> None:
    from megatron_sdar.utils.distributed import init_process_group, initialize_megatron_parallel

    init_process_group()
    import torch.distributed as dist

    world = dist.get_world_size()
    tp = args.tp if args.tp is not None else max(1, world // args.pp)
    if world % (tp * args.pp):
        raise SystemExit(f"error: world size {world} is not divisible by tp*pp = {tp}*{args.pp}")
    args.tp = tp
    initialize_megatron_parallel(tp=tp, pp=args.pp)


def _clear_output(out: Path) -> None:
    """Rank 0 empties (``--force``) and creates the output directory; everyone waits."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        if out.is_dir():
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()


def hf_to_megatron(args) -> None:
    import torch.distributed as dist

    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.models.checkpoint import save_model_checkpoint
    from megatron_sdar.models.hf_loader import load_hf_weights
    from megatron_sdar.models.megatron_model import build_model

    arch = QwenArchitecture.from_hf_config(args.hf)
    arch.check_tensor_parallel(args.tp)
    _clear_output(args.out)
    model = build_model(arch, initialize_weights=False)
    show = dist.get_rank() == 0 and not args.no_progress
    load_hf_weights(model, arch, args.hf, progress=show)
    if show:
        print(f"saving Megatron distributed checkpoint (tp={args.tp}, pp={args.pp}) to {args.out}", flush=True)
    save_model_checkpoint(model, arch, args.out, hf_assets_source=args.hf)


def megatron_to_hf(args) -> None:
    import torch

    from megatron_sdar.models.checkpoint import load_model_checkpoint, read_checkpoint_model_info
    from megatron_sdar.models.hf_export import export_hf
    from megatron_sdar.models.megatron_model import build_model

    info = read_checkpoint_model_info(args.ckpt, args.hf_config)
    arch = info.arch
    arch.check_tensor_parallel(args.tp)
    _clear_output(args.out)
    model = build_model(arch, initialize_weights=False)
    load_model_checkpoint(model, args.ckpt)
    dtype = getattr(torch, args.dtype) if args.dtype else arch.torch_dtype_object()
    export_hf(model, arch, args.out, dtype=dtype, assets_dir=info.assets_dir,
              max_shard_bytes=int(args.max_shard_size * 1024**3), progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_inputs(parser, args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.monotonic()
    _setup_parallel(args)
    from megatron_sdar.utils.distributed import destroy

    try:
        if args.command == "hf-to-megatron":
            hf_to_megatron(args)
        else:
            megatron_to_hf(args)
        import torch.distributed as dist

        if dist.get_rank() == 0:
            print(f"{args.command}: wrote {args.out} in {time.monotonic() - start:.1f}s", flush=True)
    finally:
        destroy()
    return 0


if __name__ == "__main__":  # required: dist_checkpointing starts helper processes with spawn
    sys.exit(main())
