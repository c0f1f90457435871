"""`ckpt-watch merge`: consolidate a sharded checkpoint (or average several) into a Hugging Face model folder.

    ckpt-watch merge CKPT_DIR -o OUT [--variant regular|ema|all] [--dtype bf16|fp16|fp32] [--base-model DIR]
    ckpt-watch merge --average CKPT [CKPT ...] -o OUT [...]

Exit status: 0 merged, 1 the checkpoint cannot be merged (a one-line error naming the file; nothing is left
behind), 2 usage error.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from watcher.formatting import human_bytes

DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "fp32": "float32", "float32": "float32"}  # fmt: skip


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    try:
        return int(upper)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)") from None


def parser() -> argparse.ArgumentParser:
    from watcher.cli.common import _Parser

    p = _Parser(prog="ckpt-watch merge", description=__doc__.splitlines()[0],
                epilog="CKPT_DIR is one checkpoint folder (output/checkpoint-500, torchtitan's step-1000), as the "
                       "trainer wrote it: a PyTorch Distributed Checkpoint (accelerate/HF Trainer FSDP "
                       "pytorch_model_fsdp_0/, torchtitan), per-rank model_world_size_W_rank_R.pt files "
                       "(LMMs-Engine, veRL) or consolidated safetensors. Exit status: 0 merged, 1 cannot be "
                       "merged (nothing is left behind), 2 usage error.")  # fmt: skip
    p.add_argument("checkpoints", nargs="+", type=Path, metavar="CKPT_DIR",
                   help="the checkpoint folder to merge (several, with --average)")  # fmt: skip
    p.add_argument("-o", "--output", type=Path, required=True, help="the model folder to create")
    p.add_argument("--average", action="store_true", help="average the given checkpoints tensor by tensor")
    p.add_argument("--variant", choices=("regular", "ema", "all"), default="regular",
                   help="which weights; `all` writes OUT/regular and OUT/ema")  # fmt: skip
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="cast floating-point weights (default: keep)")
    p.add_argument("--base-model", type=Path, help="config and tokenizer files when the checkpoint lacks them")
    p.add_argument("--shard-size", type=_size, default="5GB", metavar="SIZE",
                   help="largest safetensors file written: a number of bytes or with a unit, KB MB GB (powers of "
                        "1000) or KiB MiB GiB (powers of 1024), e.g. 500MB, 2GiB (default: 5GB)")  # fmt: skip
    return p


def main(argv: list[str]) -> int:
    from merge import MergeError, average_checkpoints, merge_checkpoint, variants_of
    from merge.writer import ByteProgress
    from watcher.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, print_error

    args = parser().parse_args(argv)
    if len(args.checkpoints) > 1 and not args.average:
        print_error("ckpt-watch merge", "several checkpoints given; add --average to average them")
        return EXIT_USAGE
    dtype = DTYPE_NAMES.get(args.dtype) if args.dtype else None
    first = args.checkpoints[0]
    variants = variants_of(first) if args.variant == "all" else [args.variant]
    written = 0
    start = time.monotonic()
    try:
        for variant in variants:
            out = args.output / variant if args.variant == "all" else args.output
            counted = ByteProgress(lambda done, total: None)
            if args.average:
                average_checkpoints(args.checkpoints, out, variant, dtype, args.base_model, args.shard_size, counted)
            else:
                merge_checkpoint(first, out, variant, dtype, args.base_model, args.shard_size, counted)
            written += counted.done
    except MergeError as exc:
        print_error("ckpt-watch merge", str(exc))
        return EXIT_FAILED
    except OSError as exc:  # a full disk or quota, a folder we may not write: the merge cleaned up after itself
        where = f" ({exc.filename})" if exc.filename else ""
        print_error("ckpt-watch merge", f"cannot write {args.output}: {exc.strerror or exc}{where}")
        return EXIT_FAILED
    seconds = time.monotonic() - start
    rate = written / seconds if seconds > 0 else 0.0
    print(f"wrote {human_bytes(written)} ({', '.join(variants)}) to {args.output} in {seconds:.1f} s "
          f"({human_bytes(rate)}/s)")
    return EXIT_OK
