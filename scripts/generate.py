"""Generate text from a transformax-train run folder or a Hugging Face model folder on disk.

    python scripts/generate.py runs/gpt_small --prompt "def " --max-new-tokens 200
    python scripts/generate.py ./my-hf-gpt2 --prompt "Hello" --temperature 0 --num 2
    python scripts/generate.py ./hf-folder-without-tokenizer --ids 1 2 3

A run folder (it has ``config.yaml``) holds a byte-level model: the prompt's UTF-8 bytes are
its tokens. A Hugging Face folder (``config.json`` + weights; GPT-2 or Llama) is converted with
``transformax.models.from_hf``; its tokenizer is used when the folder has one, else pass
``--ids`` and get ids back. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load(path: Path):
    """``(module, params, cfg, tokenizer, eos_id)``; ``tokenizer`` is ``None`` for a Hugging Face
    folder without one and ``"bytes"`` for a byte-level training run."""
    if (path / "config.yaml").exists():
        from transformax import train

        run_cfg, state = train.load_run(path)
        if not run_cfg.task.decoder:
            raise ValueError(f"model.arch={run_cfg.model.arch!r} does not generate text")
        return run_cfg.task.module, state.params, run_cfg.model_config, "bytes", None
    import transformers

    from transformax import models

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path)
    module, params, cfg = models.from_hf(hf_model)
    has_tokenizer = any((path / f).exists() for f in TOKENIZER_FILES)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    eos = hf_model.generation_config.eos_token_id
    return module, params, cfg, tokenizer, eos[0] if isinstance(eos, list) else eos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a transformax-train run folder or a Hugging Face "
                                                "model folder")
    parser.add_argument("--prompt", default="", help="prompt text")
    parser.add_argument("--ids", type=int, nargs="+", help="prompt token ids (instead of text)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--num", type=int, default=1, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from transformax import generate

    try:
        module, params, cfg, tokenizer, eos = load(args.path)
        if args.ids is not None:
            ids = args.ids
        elif tokenizer == "bytes":
            ids = list(args.prompt.encode())
        elif tokenizer is not None:
            ids = tokenizer(args.prompt)["input_ids"]
        else:
            raise ValueError(f"{args.path} has no tokenizer: pass the prompt as --ids")
        if not ids:
            raise ValueError("empty prompt: pass --prompt TEXT or --ids")
        prompts = np.tile(np.asarray(ids, np.int32), (args.num, 1))
        out = generate.generate(module, params, cfg, prompts, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                rng=jax.random.key(args.seed), eos_id=eos, pad_id=-1)
    except (ValueError, OSError) as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 1
    for row in np.asarray(out):
        new = [int(i) for i in row if i >= 0]
        if args.ids is not None or tokenizer is None:
            print(" ".join(map(str, new)))
        elif tokenizer == "bytes":
            print(args.prompt + bytes(new).decode("utf-8", errors="replace"))
        else:
            print(tokenizer.decode(ids + new, skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
