"""The main job: ``python -m megatron_sdar.train`` (Hydra; torchrun for several ranks)."""
import sys


def main() -> int:
    print(
        "megatron-sdar: the SDAR trainer has not landed yet (see the trainer issue). The environment "
        "is ready: run the tests with `bash tools/run.sh -m pytest`.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
