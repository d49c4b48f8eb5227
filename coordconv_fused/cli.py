"""The ``coordconv-fused`` command line.

``coordconv-fused bench``  times CoordConv against plain nn.Conv2d and the naive concatenation.
``coordconv-fused paper``  the paper's experiments: the coordinate classification, regression and
rendering tasks, and (``paper extended``) detection on scattered MNIST and GANs / VAEs on coloured shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from .malloc_tunables import GLIBC_TUNABLES

DESCRIPTION = """\
CoordConv layers at the cost of a plain convolution: tools.

  coordconv-fused bench   time CoordConv against nn.Conv2d and the naive torch.cat port
  coordconv-fused paper   the paper's experiments: coordinate classification, regression and rendering,
                          detection on scattered MNIST, GANs and VAEs on coloured shapes"""


def _require(extra: str, *modules: str) -> None:
    """Exit with the install command when a tool's optional dependencies are missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(
            f"coordconv-fused {extra} needs {', '.join(missing)}: "
            f"pip install 'coordconv-fused[{extra}]' (or pip install {' '.join(missing)})"
        )


# `bench --isa avx2`: the whole process computes as on an AVX2-only CPU -- this package's kernels,
# oneDNN's and ATen's vectorised ops (each read once, at start-up: hence a re-run).
AVX2_ONLY = {"COORDCONV_NO_AVX512": "1", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def _bench(args: argparse.Namespace) -> int:
    wanted: dict[str, str] = dict(AVX2_ONLY) if args.isa == "avx2" else {}
    if args.glibc_tunables and sys.platform == "linux":
        wanted["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    if any(os.environ.get(k) != v for k, v in wanted.items()):
        env = dict(os.environ, **wanted)
        os.execve(sys.executable, [sys.executable, "-m", "coordconv_fused.cli", *sys.argv[1:]], env)

    _require("bench", "tqdm", "matplotlib")
    import torch
    from tqdm import tqdm

    from . import benchmark, call_cost

    if args.device == "cuda":
        return _bench_cuda(args)

    torch.set_num_threads(args.threads)
    shapes = benchmark.STANDARD_SHAPES if args.all_shapes else benchmark.QUICK_SHAPES
    rounds = args.rounds
    if args.quick:
        shapes, rounds = shapes[:1], 1
    if args.call_cost_only:
        shapes = []
    modes = ("forward", "forward+backward")
    steps = len(shapes) * (len(modes) * rounds + (0 if args.no_memory else 2 + len(benchmark.default_backends())))
    steps += 0 if args.no_call_cost else 2 + (0 if args.quick else 1)
    with tqdm(total=steps, desc="bench", unit="step", file=sys.stderr, leave=False) as bar:

        def progress(message: str) -> None:
            bar.set_postfix_str(message)
            bar.update(1)

        report = benchmark.run(
            shapes,
            modes,
            rounds=rounds,
            memory=not args.no_memory,
            progress=progress,
            sample_seconds=0 if args.quick else benchmark.SAMPLE_SECONDS,  # (a smoke run: one call a sample)
        )
        if not args.no_call_cost:
            # a smoke run takes one short round; torch.compile (tens of seconds of compilation) only in full runs
            report["host_overhead"] = call_cost.host_overhead(
                benchmark.default_backends(),
                rounds=1 if args.quick else max(rounds, 5),
                per_round=5 if args.quick else 200,
                progress=progress,
            )
            if not args.quick:
                report["compiled"] = call_cost.compiled_ratio(rounds=max(rounds, 5), progress=progress)
    if shapes:
        print(benchmark.format_report(report))
    for key, fmt in (("host_overhead", call_cost.format_host_overhead), ("compiled", call_cost.format_compiled)):
        if key in report:
            print()
            print(fmt(report[key]))
    if not shapes:
        m = report["machine"]
        print(f"\n{report['date']}; {m['processor']}, {m['cpus']} CPUs, torch {m['torch']}.")
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, "bench.json"), os.path.join(args.out, "bench.png")
    benchmark.save(report, json_path)
    if shapes:
        benchmark.plot(report, png_path)
        print(f"\nwrote {json_path} and {png_path}")
    else:
        print(f"\nwrote {json_path}")
    return 0


def _bench_cuda(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from . import benchmark, call_cost, gpu_benchmark

    if not torch.cuda.is_available():
        sys.exit("coordconv-fused bench --device cuda: no CUDA GPU is visible")
    shapes = gpu_benchmark.GPU_SHAPES if args.all_shapes else gpu_benchmark.GPU_SHAPES[-5:]
    reps = args.rounds
    if args.quick:
        shapes, reps = shapes[:1], 3
    dtypes = ("float32", "bfloat16-cl")
    with tqdm(total=len(shapes) * len(dtypes) * 2, desc="bench cuda", unit="step", file=sys.stderr, leave=False) as bar:

        def progress(message: str) -> None:
            bar.set_postfix_str(message)
            bar.update(1)

        report = gpu_benchmark.run(shapes, dtypes, reps=reps, compiled=args.compiled, progress=progress)
        if not args.no_call_cost:
            report["host_overhead"] = call_cost.host_overhead(
                [b for b in gpu_benchmark.available_backends("cuda") if b != "reference"] + ["auto"],
                device="cuda",
                rounds=3 if args.quick else 9,
                per_round=20 if args.quick else 200,
            )
            if args.compiled and not args.quick:  # (two torch.compile runs: a minute)
                report["compiled"] = call_cost.compiled_ratio(device="cuda", shape=(64, 64, 56, 56), rounds=9)
    print(gpu_benchmark.format_report(report))
    for key, fmt in (("host_overhead", call_cost.format_host_overhead), ("compiled", call_cost.format_compiled)):
        if key in report:
            print()
            print(fmt(report[key]))
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, "bench-cuda.json"), os.path.join(args.out, "bench-cuda.png")
    benchmark.save(report, json_path)
    benchmark.plot(report, png_path)
    print(f"\nwrote {json_path} and {png_path}")
    if args.epilogue_policies:
        print("\nThe cuda backend's forward under each epilogue policy (GPU time):\n")
        print(gpu_benchmark.epilogue_policies(shapes, reps=reps))
    if args.profile:  # (after the report is saved)
        print(gpu_benchmark.kernel_breakdown(shapes[:2], "bfloat16-cl"))
        print(gpu_benchmark.kernel_breakdown(shapes[:1], "float32"))
    return 0


@contextlib.contextmanager
def _progress_bar(desc: str):
    """A tqdm bar on stderr, driven by the experiments' ``progress(message, total=None)`` callback:
    ``total`` adds steps to the bar (the ETA follows), ``message=None`` is one step, a message is shown."""
    from tqdm import tqdm

    with tqdm(desc=desc, file=sys.stderr, leave=False, unit="step", total=0) as bar:

        def progress(message, total=None):
            if total is not None:
                bar.total += total
                bar.refresh()
            elif message is None:
                bar.update(1)
            else:
                bar.set_postfix_str(message)

        yield progress


EXTENDED = ("detection", "shapes-gan", "shapes-vae")


def _paper(args: argparse.Namespace) -> int:
    _require("paper", "tqdm", "matplotlib")
    import torch

    torch.set_num_threads(args.threads)
    if args.task in EXTENDED or args.task == "extended":
        for task in EXTENDED if args.task == "extended" else (args.task,):
            _paper_extended(task, args)
        return 0
    from .paper import train

    if args.task == "all":
        runs = [(t, s, m) for t in train.TASKS for s in ("uniform", "quadrant") for m in ("coordconv", "baseline")]
    elif args.task == "demo":
        runs = [("classification", args.split, "coordconv"), ("classification", args.split, "baseline")]
    else:
        runs = [(args.task, args.split, args.model)]
    results = []
    os.makedirs(args.out, exist_ok=True)
    for task, split, model in runs:
        for seed in args.seeds if model == "coordconv" else args.baseline_seeds:
            cfg = train.RunConfig(
                task=task,
                split=split,
                model=model,
                seed=seed,
                quick=args.quick,
                lr=args.lr,
                max_epochs=args.epochs,
                max_attempts=args.attempts,
                baseline_epochs=args.baseline_epochs,
            )
            with _progress_bar(f"{task} {split} {model} seed {seed}") as progress:
                result = train.run(cfg, progress=progress)
            prefix = os.path.join(args.out, f"{task}-{split}-{model}-seed{seed}")
            result["figures"] = train.figures(result, prefix)
            results.append(result)
            print(train.markdown_table([result]).splitlines()[-1], file=sys.stderr)
    print(train.markdown_table(results))
    print()
    print(train.summary_table(results))
    path = train.save(results, args.out)
    print(f"\nwrote {path} and figures in {args.out}/")
    return 0


def _paper_extended(task: str, args: argparse.Namespace) -> None:
    """Detection (S6) or a GAN / VAE (S7) on this library's layers: the convolutional model and the
    CoordConv model on the same data, each with every seed; a table, JSON and figures."""
    if task == "detection":
        _require("paper", "torchvision", "mlxtend")
    from .paper.train import public

    out = os.path.join(args.out, task)
    os.makedirs(out, exist_ok=True)
    results: list[dict] = []
    if task == "detection":
        from .paper import detection, scattered_mnist

        n_train, n_test, _ = detection.DetectionConfig(quick=args.quick).sizes()
        print(f"detection: generating {n_train:,} training and {n_test:,} test canvases", file=sys.stderr)
        data = scattered_mnist.make_dataset(n_train, n_test)
        for model in ("conv", "coordconv"):
            for seed in args.seeds:
                with _progress_bar(f"detection {model} seed {seed}") as progress:
                    r = detection.run(
                        detection.DetectionConfig(model=model, seed=seed, quick=args.quick),
                        progress=progress,
                        data=data,
                    )
                m = r["test"]
                print(
                    f"detection {model} seed {seed}: total loss {m['total_loss']:.4f}, IoU-average "
                    f"{m['iou_average']:.4f}, IoU-select {m['iou_select']:.4f} ({r['seconds']:.0f} s)",
                    file=sys.stderr,
                )
                results.append(r)
        table = detection.markdown_table(results)
        figures = [detection.figure(results, os.path.join(out, "detections.png"))]
        summary = detection.summary(results)
    else:
        from .paper import generative, shapes

        kind = task.split("-")[1]
        defaults = generative.GenerativeConfig(kind=kind, quick=args.quick)
        n_train, _, _ = defaults.budget()
        images = shapes.make_shapes(n_train, defaults.data_seed)[0]
        samples = 64 if args.quick else defaults.samples
        for model in ("conv", "coordconv"):
            for seed in args.seeds:
                with _progress_bar(f"{kind} {model} seed {seed}") as progress:
                    r = generative.run(
                        generative.GenerativeConfig(kind=kind, model=model, seed=seed, quick=args.quick),
                        progress=progress,
                        data=images,
                    )
                e = r["samples"]
                print(
                    f"{kind} {model} seed {seed}: coverage entropy {e['coverage_entropy']:.2f} bits, relative "
                    f"{e['relative_entropy']:.2f} bits, both objects {100 * e['both_objects']:.0f}% "
                    f"({r['seconds']:.0f} s)",
                    file=sys.stderr,
                )
                results.append(r)
        data_measures = generative.data_entropies(samples)
        table = generative.summary(results, data_measures)
        figures = generative.figures(results, shapes.make_shapes(samples, 1)[0], kind, os.path.join(out, kind))
        summary = {"data": data_measures}
    print(table)
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump({"runs": [public(r) for r in results], "summary": summary, "figures": figures}, f, indent=1)
    print(f"\nwrote {path} and {', '.join(figures)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coordconv-fused", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time CoordConv providers side by side against nn.Conv2d")
    bench.add_argument(
        "--rounds",
        type=int,
        default=7,
        help="interleaved rounds; fewer than 3 is a smoke run, judged against no target (default: %(default)s)",
    )
    bench.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    bench.add_argument("--all-shapes", action="store_true", help="all standard shapes, not the quick three")
    bench.add_argument("--quick", action="store_true", help="one shape, one round: a smoke run, not a timing")
    bench.add_argument("--out", default="results", help="folder for bench.json and bench.png (default: results)")
    bench.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    bench.add_argument(
        "--no-call-cost",
        action="store_true",
        help="skip the per-call host time (tiny input) and the torch.compile comparison",
    )
    bench.add_argument(
        "--call-cost-only", action="store_true", help="only the per-call host time and the torch.compile comparison"
    )
    bench.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu (default) or cuda: CUDA-event timing, float32 and bfloat16 channels_last, the GPU shapes "
        "(all with --all-shapes, else the five batch-64/32 ones)",
    )
    bench.add_argument(
        "--profile", action="store_true", help="with --device cuda: also the CUDA kernels of each provider (profiler)"
    )
    bench.add_argument(
        "--epilogue-policies",
        action="store_true",
        help="with --device cuda: also the cuda backend's forward under each policy of its epilogue (rule, "
        "16-byte accesses everywhere, nowhere, split in two kernels), side by side",
    )
    bench.add_argument(
        "--compiled",
        action="store_true",
        help="with --device cuda: also torch.compile'd nn.Conv2d and CoordConv2d, and the compiled "
        "CoordConv2d + ReLU against Conv2d + ReLU",
    )
    bench.add_argument(
        "--isa",
        choices=["native", "avx2"],
        default="native",
        help="avx2: re-run with this package's AVX-512 kernels, oneDNN and ATen all limited to AVX2, "
        "as on an AVX2-only CPU (default: %(default)s, what the CPU offers)",
    )
    bench.add_argument(
        "--no-glibc-tunables",
        dest="glibc_tunables",
        action="store_false",
        help="do not re-run with glibc's malloc tunables set (by default the benchmark re-runs "
        "itself so that large freed buffers stay mapped)",
    )
    bench.set_defaults(func=_bench)

    paper = sub.add_parser("paper", help="the paper's coordinate-transform tasks on Not-so-Clevr")
    paper.add_argument(
        "task",
        choices=["classification", "regression", "rendering", "demo", "all", *EXTENDED, "extended"],
        help="'demo': classification, CoordConv vs the deconv baseline on one split; 'all': "
        "every task on both splits, CoordConv and baseline; 'detection', 'shapes-gan', 'shapes-vae': "
        "the conv and the CoordConv model, every seed; 'extended': those three",
    )
    paper.add_argument(
        "--split",
        choices=["uniform", "quadrant"],
        default="quadrant",
        help="train/test split of the centres (default: %(default)s)",
    )
    paper.add_argument(
        "--model",
        choices=["coordconv", "baseline"],
        default="coordconv",
        help="model for a single task (default: %(default)s)",
    )
    paper.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="CoordConv seeds; in detection and shapes-*, the seeds of both models (default: %(default)s)",
    )
    paper.add_argument(
        "--baseline-seeds", type=int, nargs="+", default=[0], help="baseline seeds (default: %(default)s)"
    )
    paper.add_argument("--lr", type=float, default=None, help="learning rate (default: 5e-3 CoordConv, 1e-3 baseline)")
    paper.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs of one CoordConv attempt, cosine-decayed "
        "(default: 10 for classification and rendering, 6 for regression)",
    )
    paper.add_argument(
        "--attempts",
        type=int,
        default=3,
        help="CoordConv attempts at most: a restart while the validation block is not perfect (classification, "
        "rendering: not right by a centre-logit margin of 1) (default: %(default)s)",
    )
    paper.add_argument(
        "--baseline-epochs", type=int, default=10, help="epochs of a baseline run (default: %(default)s)"
    )
    paper.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    paper.add_argument("--quick", action="store_true", help="a few steps on a subset: a smoke run, not a result")
    paper.add_argument("--out", default="results/paper", help="folder for results and figures (default: %(default)s)")
    paper.set_defaults(func=_paper)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
