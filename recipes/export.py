"""Export a stage's output for use without rlhf-kit, and optionally push it to the Hugging Face Hub.

    python recipes/export.py --config recipes/configs/export/tiny.yaml
    rlhf-kit export outputs/tiny-ppo --formats merged gguf        # the same recipe, model_path given first

Works on the output of any stage (SFT, reward model, PPO, ...). `formats` picks what is written to output_dir:
  adapter  the LoRA adapter in PEFT's standard layout (loads with plain `peft`)
  merged   the adapter folded into its base, reloaded in 16/32-bit (also for QLoRA), as sharded safetensors with the
           tokenizer, chat template and generation config (stop tokens); a reward model keeps its score head and
           normalization (rlhf_kit_reward.json)
  gguf     one file per `gguf_types` entry (f16, q8_0, ...) for llama.cpp-based tools (LLaMA causal LMs)
Every export gets a README.md model card with the lineage (base -> SFT -> reward model -> PPO), each stage's config,
data, metrics and library versions, and the stage record and configs beside it. With `push_to_hub: true` the
directory is uploaded to `hub_model_id` (private unless hub_private_repo: false; `dry_run: true` only lists files).
"""

import time
from pathlib import Path

from rlhf_kit.config import parse_config
from rlhf_kit.errors import run_main
from rlhf_kit.stages import recipe_arguments
from rlhf_kit.publish.export import export
from rlhf_kit.publish.hub import push_folder, require_token


def main(argv=None, overrides=None):
    (args,) = parse_config(*recipe_arguments("export"), args=argv, overrides=overrides)
    # A push that cannot happen fails now, not after minutes of merging and quantizing.
    if args.push_to_hub and not args.dry_run:
        require_token()

    started = time.time()
    written = export(args)
    out = Path(args.output_dir)
    print(f"== export finished in {time.time() - started:.0f}s: {out}")
    for artifact, files in written.items():
        size = sum((out / f).stat().st_size for f in files) / 1e6
        print(f"  {artifact:<8} {len(files):>3} files  {size:9.2f} MB  {', '.join(files[:4])}"
              + (" ..." if len(files) > 4 else ""))
    print(f"  card     {out / 'README.md'}")

    result = None
    if args.push_to_hub:
        result = push_folder(out, args.hub_model_id, private=args.hub_private_repo, revision=args.hub_revision,
                             commit_message=args.commit_message, dry_run=args.dry_run)
        print(result.summary())
    return written, result


if __name__ == "__main__":
    run_main(main)  # a user error: its message, no traceback
