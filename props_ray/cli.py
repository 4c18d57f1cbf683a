"""The ``props-ray`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

from props_ray.bench.suite import SECTIONS as BENCH_SECTIONS
from props_ray.config import load_job
from props_ray.errors import UserError


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set train.num_workers=1")
    p.add_argument("-v", "--verbose", dest="verbose_here", action="store_true",
                   help="also show Ray's own worker output and library logs (off by default)")


def cmd_validate(args) -> int:
    """The config, then the data step of every variant (data, partitions, delta, the ledger's plan):
    everything a run would refuse, without starting Ray or drawing a label."""
    from props_ray.data.prepare import label_epsilon_max, prepare_data

    cfg = load_job(args.job, args.overrides)
    trials = cfg.trials()
    print(f"{args.job}: valid job '{cfg.name}' with {len(trials)} trial(s): "
          + ", ".join(f"{m.display_name}" + ("" if e is None else f"@eps={e:g}") for m, e in trials)
          + (f"; x {len(cfg.variants())} sweep variants (seeds {[v.seed for v in cfg.variants()]}, "
             f"K {[v.stages for v in cfg.variants()]})" if cfg.is_sweep else ""))
    from props_ray.methods import METHODS

    for name in dict.fromkeys(m.method for m in cfg.methods):
        print(f"  {name} protects {METHODS[name].protects}")
    if cfg.privacy_status != "private":
        print(f"randomness: seeded ({cfg.privacy_status}): RR labels and DP-SGD noise can be replayed from the seed")
    if args.config_only:
        print("config only: the data, its partitions and the ledger were not checked")
        return 0
    for variant in cfg.variants():
        data = prepare_data(variant)
        eps = label_epsilon_max(variant)
        plan = {"none": "has no label-DP trial", "reuse": f"reuses it for epsilon <= {eps:g}" if eps else "",
                "draw": f"draws at epsilon {eps:g}" if eps else ""}[data.ledger_action]
        print(f"data (seed {variant.seed}, K = {variant.stages}): {data.num_pairs} training pairs from {data.source} "
              f"in partitions {[len(p) for p in data.partitions]}, {len(data.eval_prompts)} held-out prompts"
              + data.skipped_summary())
        print(f"  {data.ledger.describe()}; this job {plan}")
    return 0


def cmd_run(args) -> int:
    from props_ray.driver import Job
    from props_ray.results import format_table, summary_table

    cfg = load_job(args.job, args.overrides)
    t0 = time.time()
    results = Job(cfg).run()
    print()
    print(format_table(summary_table(results)))
    print(f"\njob {cfg.name} finished in {time.time() - t0:.1f}s")
    return 0


def cmd_report(args) -> int:
    from props_ray.report import report_command

    return report_command(args.target, args.tracking_uri, args.markdown, args.plots)


def cmd_submit(args) -> int:
    from props_ray.submit import submit

    return submit(args)


def cmd_bench(args) -> int:
    from props_ray.bench.suite import run_bench

    sections = args.only or list(BENCH_SECTIONS)
    run_bench(args.quick, sections, args.output_dir, job=args.job, json_path=args.json, overrides=args.overrides,
              throughput_model=args.throughput_model)
    return 0


def cmd_sft(args) -> int:
    """SFT of model.name on the preferred responses of a split kept apart: the reference, written to --out."""
    from props_ray.sft import run_sft

    cfg = load_job(args.job, args.overrides)
    info = run_sft(cfg, args.data, args.out, args.epsilon)
    print(f"{args.out}: {cfg.model.name} fine-tuned on the chosen responses of {info['examples']:,} pairs of "
          f"{args.data} in {info['seconds']:.0f}s; privacy: {info['privacy']}. Use it as model.name: {args.out}")
    return 0


def cmd_reward_model(args) -> int:
    """A judge for real data, trained on a public or held-out split with the job's model and settings."""
    from props_ray.judge_training import train_judge

    cfg = load_job(args.job, args.overrides)
    info = train_judge(cfg, args.data, args.out, args.held_out)
    print(f"{args.out}: judge trained on {info['train_pairs']:,} pairs of {args.data} in {info['seconds']:.0f}s; "
          f"held-out accuracy {info['held_out_accuracy']:.3f} on {info['held_out_pairs']:,} pairs. "
          f"Use it as eval.judge: {args.out} (privacy: none, it is trained without noise on that split)")
    return 0


def cmd_split(args) -> int:
    """A preference file in two reproducible parts: --fraction of it kept apart, the rest private."""
    from props_ray.data.loaders import load_preferences
    from props_ray.data.split import split_pairs, write_pairs

    if not 0 < args.fraction < 1:
        raise UserError(f"split: --fraction must be between 0 and 1, got {args.fraction}")
    loaded = load_preferences(args.source, args.format, on_bad_row=args.on_bad_row)
    rest, apart = split_pairs(loaded.pairs, args.fraction, args.seed)
    write_pairs(apart, args.apart)
    write_pairs(rest, args.rest)
    print(f"{args.source}: {len(loaded.pairs):,} pairs ({len(loaded.skipped)} rows skipped) -> {len(apart):,} kept "
          f"apart in {args.apart}, {len(rest):,} private in {args.rest}")
    return 0


def cmd_init_model(args) -> int:
    """A BPE tokenizer built on TEXT and a small random model of a named architecture, saved to --out."""
    from pathlib import Path

    from props_ray.offline import init_model

    src = Path(args.text)
    if not src.is_file():
        raise UserError(f"init-model: text file {src} does not exist")
    if src.suffix == ".txt":
        texts = [line for line in src.read_text(errors="replace").splitlines() if line.strip()]
    else:  # a preference file: its prompts and both responses (never its labels)
        from props_ray.data.loaders import load_preferences

        pairs = load_preferences(str(src), args.format, on_bad_row="skip").pairs
        texts = [*pairs["prompt"], *pairs["chosen"], *pairs["rejected"]]
    if not texts:
        raise UserError(f"init-model: {src} has no text")
    try:
        info = init_model(args.out, texts, args.architecture, args.vocab_size, args.min_frequency,
                          args.hidden_size, args.num_layers, args.num_heads, args.max_positions, args.seed)
    except ValueError as err:
        raise UserError(f"init-model: {err}") from None
    print(f"{args.out}: {info['architecture']} model, {info['parameters']:,} parameters, hidden {info['hidden_size']}, "
          f"{info['num_layers']} layers; BPE tokenizer of {info['vocab_size']} tokens built on {len(texts):,} texts "
          f"of {src} (pieces seen at least {args.min_frequency} times). Use it as model.name: {args.out}")
    return 0


def cmd_ui(args) -> int:
    from props_ray.config import TrackingConfig

    uri = args.tracking_uri or TrackingConfig().resolved_uri()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", "1"]  # one user's local UI: not 4 server processes
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {uri} at {base}", flush=True)
    for name, url in experiment_urls(uri, base):
        print(f"  {name}: {url}", flush=True)
    return subprocess.call(cmd)


def experiment_urls(uri: str, base: str) -> list[tuple[str, str]]:
    """Each props-ray experiment's runs table (model-training mode), newest first: the trials view
    (:data:`props_ray.tracking.TRIALS_VIEW_STATE`) where the experiment has it."""
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        return []
    from mlflow.tracking import MlflowClient

    from props_ray.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, TRIALS_VIEW, TRIALS_VIEW_TAG

    exps = [e for e in MlflowClient(tracking_uri=uri).search_experiments()
            if e.tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND]
    exps.sort(key=lambda e: e.last_update_time or 0, reverse=True)
    return [(e.name, f"{base}/#/experiments/{e.experiment_id}/runs?workflowType=machine_learning"
                     + (f"&viewStateShareKey={TRIALS_VIEW}" if TRIALS_VIEW_TAG in e.tags else "")) for e in exps]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="props-ray", description="Privacy-preserving alignment on Ray")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show Ray's own worker output and library logs (off by default)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a job on a local Ray instance or the cluster in RAY_ADDRESS")
    _job_args(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("sweep", help="run a job's grid: methods x epsilons x sweep.seeds x sweep.stages, "
                                     "with a summary over seeds and privacy-utility plots")
    _job_args(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("report", help="print the summary table of a job (or experiment) from MLflow")
    p.add_argument("target", help="job run id, job name, or experiment name/id (its latest job)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--plots", default=None, metavar="DIR", help="also write the plots to DIR")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("validate", help="check a job file and its data step (data, partitions, delta, the "
                                        "ledger's plan) without starting Ray or drawing a label")
    _job_args(p)
    p.add_argument("--config-only", action="store_true",
                   help="check the config alone, without reading the data (e.g. data on a cluster volume)")
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("submit", help="submit a job to a Ray cluster (Ray Jobs API) and follow its logs")
    _job_args(p)
    from props_ray.submit import add_arguments

    add_arguments(p)
    p.set_defaults(fn=cmd_submit)
    p = sub.add_parser("bench", help="benchmarks: throughput vs TRL, DP-SGD overhead, relabel throughput, "
                                     "demo wall time; prints a table of ratios against their goals")
    p.add_argument("--quick", action="store_true", help="a reduced run (a few minutes on a 2-core CPU)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every figure to PATH as JSON")
    p.add_argument("--only", nargs="+", choices=BENCH_SECTIONS, default=None)
    p.add_argument("--job", default="jobs/demo.yaml", help="the job the demo section runs (default jobs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a field of the demo section's job (repeatable)")
    p.add_argument("--output-dir", default="runs/bench", help="where the bench's jobs write (default runs/bench)")
    p.add_argument("--throughput-model", choices=["tiny", "pythia-160m-arch"], default=None,
                   help="the throughput section's model (default: tiny with --quick, else pythia-160m-arch)")
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("sft", help="SFT the job's base model on the preferred responses of a split kept apart "
                                   "from the preference data: the reference (DP-SGD with --epsilon)")
    _job_args(p)
    p.add_argument("--data", required=True, help="the SFT split: a preference file or hub id (not data.source)")
    p.add_argument("--out", required=True, help="directory to write; model.name accepts it")
    p.add_argument("--epsilon", type=float, default=None,
                   help="DP-SGD with the example as the unit at this epsilon (default: not private, said so)")
    p.set_defaults(fn=cmd_sft)
    p = sub.add_parser("reward-model", help="train a judge reward model on a public or held-out split of labelled "
                                            "pairs, with the job's model and training settings")
    _job_args(p)
    p.add_argument("--data", required=True, help="the judge's pairs: a preference file or hub id (not data.source)")
    p.add_argument("--out", required=True, help="directory to write; eval.judge accepts it")
    p.add_argument("--held-out", type=float, default=0.1, help="share of the pairs kept to measure its accuracy")
    p.set_defaults(fn=cmd_reward_model)
    p = sub.add_parser("split", help="split a preference file in two reproducible parts: one kept apart (SFT, a "
                                     "judge, a tokenizer) and the private preference data")
    p.add_argument("source", help="a preference file (any format data.source reads)")
    p.add_argument("--apart", required=True, help="JSONL to write the kept-apart part to")
    p.add_argument("--rest", required=True, help="JSONL to write the private rest to")
    p.add_argument("--fraction", type=float, default=0.5, help="share of the pairs kept apart (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["auto", "hh_rlhf", "preference", "alpaca_eval"], default="auto")
    p.add_argument("--on-bad-row", choices=["error", "skip"], default="error")
    p.set_defaults(fn=cmd_split)
    p = sub.add_parser("init-model", help="offline start: a BPE tokenizer built on a text or preference file and "
                                          "a small random model (GPT-NeoX, GPT-2 or Llama), saved as a directory")
    p.add_argument("text", help="a .txt file (one text a line) or a preference file (its prompts and responses)")
    p.add_argument("--out", required=True, help="directory to write (model.name and eval.judge accept it)")
    p.add_argument("--architecture", choices=["gpt_neox", "gpt2", "llama"], default="gpt_neox")
    p.add_argument("--format", choices=["auto", "hh_rlhf", "preference", "alpaca_eval"], default="auto")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--min-frequency", type=int, default=5,
                   help="a piece becomes a token only if seen this often (rare strings stay out of the vocabulary)")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--max-positions", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_init_model)
    p = sub.add_parser("ui", help="open the MLflow UI on the job's tracking store")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(fn=cmd_ui)
    args = parser.parse_args(argv)
    args.verbose = args.verbose or getattr(args, "verbose_here", False)
    if args.verbose:
        os.environ["PROPS_RAY_VERBOSE"] = "1"  # read by the Ray start and passed on to every worker
    else:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no store-migration chatter
        import warnings

        for category in (FutureWarning, DeprecationWarning):  # libraries' notices to their own developers
            warnings.filterwarnings("ignore", category=category)
        # Opacus's RDP accountant when the best order is the grid's largest: the epsilon it returns is still
        # a valid (if looser) bound, and the trial logs it; --verbose shows the notice.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from props_ray.ray_runtime import QUIET_ENV

    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    try:
        return args.fn(args)
    except UserError as err:  # bad input or a refusal: one message, no traceback
        cause = getattr(err, "cause", None)  # raised in a Ray task: Ray wraps it with the task's traceback
        print(f"error: {cause if isinstance(cause, UserError) else err}", file=sys.stderr)
        return 2


def exit_now(code) -> None:
    """End the process the way the interpreter would, less its teardown: the interpreter's own thread
    shutdown (thread pools told to stop, then non-daemon threads joined), output flushed, every
    ``atexit`` handler run (Ray's shutdown, MLflow's, logging's, temporary files'), then ``os._exit``.
    The teardown that is skipped (freeing every module and object of torch, transformers and Ray) took
    about 2.5 s after each command that had loaded them, with nothing left to write."""
    import atexit
    import threading

    if not hasattr(threading, "_shutdown"):  # another interpreter: its own exit, teardown and all
        sys.exit(code)
    # What the interpreter calls first at exit; joining the threads alone would wait forever on an
    # idle thread pool that nobody shut down.
    threading._shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0)


def console() -> None:
    """The ``props-ray`` command: :func:`main`, then :func:`exit_now` with its exit status. An error that
    escapes ``main`` ends the process as usual (its traceback, status 1)."""
    exit_now(main())


if __name__ == "__main__":
    console()
