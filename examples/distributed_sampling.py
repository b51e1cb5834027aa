"""Sample in parallel with Accelerate; the files are the same, bit for bit, for any number of processes.

    accelerate launch --multi_gpu --num_processes 2 examples/distributed_sampling.py --cpu   # 2 CPU processes
    python examples/distributed_sampling.py                                                 # 1 process
    python examples/distributed_sampling.py --quick

On CPU, ``--multi_gpu`` with ``Accelerator(cpu=True)`` is what starts real processes: ``accelerate launch --cpu
--num_processes 2`` silently starts one. Each sample is seeded by its global index; blocks of ``--batch-size``
samples are shared out between the processes, gathered, and the main process writes samples.safetensors,
samples.png and manifest.json. Run it again: complete shards are skipped.
"""

from __future__ import annotations

import argparse

from accelerate import Accelerator

from score_toolkit.distributed import load_samples, sample_to_folder
from score_toolkit.pipeline import ScorePipeline, shipped_model_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="pipeline folder or cached Hub id (default: shipped digits)")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--output-dir", default="distributed_samples")
    parser.add_argument("--cpu", action="store_true", help="CPU processes (with accelerate launch --multi_gpu)")
    parser.add_argument("--quick", action="store_true", help="tiny settings (for the test suite)")
    args = parser.parse_args(argv)
    num_samples, batch_size, steps = (6, 2, 3) if args.quick else (args.num_samples, args.batch_size, args.steps)

    accelerator = Accelerator(cpu=args.cpu)
    pipe = ScorePipeline.from_pretrained(args.checkpoint or shipped_model_path("digits"))
    result = sample_to_folder(pipe, args.output_dir, num_samples, sampler=args.sampler,
                              sampler_options={"num_steps": steps}, seed=0, batch_size=batch_size,
                              shard_size=4 * batch_size, accelerator=accelerator, progress=not args.quick)
    if accelerator.is_main_process:
        samples = load_samples(result.samples_file)
        print(f"{result.num_processes} process(es): {samples.shape[0]} samples of shape {tuple(samples.shape[1:])}, "
              f"{result.shards_written} shard(s) written, {result.shards_skipped} already complete")
        print(f"wrote {result.samples_file}" + (f" and {result.picture}" if result.picture else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
