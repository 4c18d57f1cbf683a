"""``props-ray submit``: run a job on a Ray cluster through the Ray Jobs API.

The job file is validated here first (so a typo names the field before
anything is uploaded), then submitted with :class:`ray.job_submission.JobSubmissionClient`:

- entrypoint: ``props-ray run JOB.yaml --set ...`` (the job file's path relative to the working dir);
- runtime_env ``working_dir``: the current directory (or ``--working-dir``), without ``.venv``, ``runs``,
  ``mlflow.db``, ``mlruns``, ``.git`` and caches; the job's driver runs on the head node inside it;
- runtime_env ``pip``: only with ``--pip`` (the cluster image is expected to have props-ray installed);
- runtime_env ``env_vars``: ``MLFLOW_TRACKING_URI`` when set here, ``PROPS_RAY_*`` variables set here,
  and every ``--env K=V``.

The logs are streamed until the job ends; the exit code is 0 if it SUCCEEDED, 1 otherwise.
Equivalent to ``ray job submit --working-dir . -- props-ray run JOB.yaml --set ...``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from props_ray.config import ConfigError, JobConfig, load_job
from props_ray.errors import UserError

DEFAULT_EXCLUDES = ["/.venv", "/runs", "/mlflow.db", "/mlruns", "/mlartifacts", ".git", "__pycache__",
                    ".pytest_cache", "*.egg-info"]
# Ray rejects packages above its gRPC message size; keep uploads well below (code + job files only).
MAX_UPLOAD_MIB = 100
PASS_THROUGH_ENV = ("MLFLOW_TRACKING_URI",)
PASS_THROUGH_PREFIX = "PROPS_RAY_"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(UserError, ValueError):
    """A submission that cannot be made as asked; the message says what to change."""


@dataclass
class Submission:
    entrypoint: str
    runtime_env: dict
    submission_id: str
    cfg: JobConfig
    warnings: list[str] = field(default_factory=list)


def _parse_env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p or not p.split("=", 1)[0]:
            raise SubmitError(f"--env {p!r} must look like NAME=VALUE")
        k, v = p.split("=", 1)
        out[k] = v
    return out


def upload_size(root: Path, excludes: list[str]) -> tuple[int, dict[str, int]]:
    """Bytes Ray would upload from ``root`` with these excludes (and .gitignore/.rayignore, as Ray does),
    and the bytes per top-level entry."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    per_top: dict[str, int] = {}
    total = 0

    def handler(p: Path):
        nonlocal total
        if p.is_file() and not p.is_symlink():
            n = p.stat().st_size
            total += n
            rel = p.relative_to(root).parts
            per_top[rel[0]] = per_top.get(rel[0], 0) + n

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    quiet = logging.getLogger("props_ray.submit.upload")
    quiet.setLevel(logging.WARNING)
    _dir_travel(root, [_get_excludes(root, excludes)], handler, include_gitignore=include_gitignore, logger=quiet)
    return total, per_top


def build_submission(job: str, overrides: list[str], *, working_dir: str | None = None, env: list[str] = (),
                     pip: list[str] = (), excludes: list[str] = (), submission_id: str | None = None,
                     max_upload_mib: float = MAX_UPLOAD_MIB) -> Submission:
    """Validate the job locally and build what is submitted (no network)."""
    cfg = load_job(job, overrides)  # raises ConfigError naming the field
    wd = Path(working_dir or os.getcwd()).resolve()
    if not wd.is_dir():
        raise SubmitError(f"working dir {wd} is not a directory")
    job_path = Path(job).resolve()
    try:
        rel = job_path.relative_to(wd)
    except ValueError:
        raise SubmitError(f"job file {job_path} is outside the working dir {wd}, which is what gets uploaded; "
                          f"run props-ray submit from a directory that contains it (or pass --working-dir)") from None
    all_excludes = DEFAULT_EXCLUDES + list(excludes)
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(wd, all_excludes)
    if any(excluded(p) for p in [job_path, *job_path.parents] if p != wd and wd in p.parents):
        raise SubmitError(f"job file {rel} is in an excluded directory of the working dir and would not be uploaded; "
                          f"move it (e.g. under jobs/)")
    if max_upload_mib and max_upload_mib > 0:
        total, per_top = upload_size(wd, list(all_excludes))
        if total > max_upload_mib * 2**20:
            biggest = ", ".join(f"{k} ({v / 2**20:.1f} MiB)" for k, v in
                                sorted(per_top.items(), key=lambda kv: -kv[1])[:5])
            raise SubmitError(f"the working dir {wd} would upload {total / 2**20:.1f} MiB, over the "
                              f"{max_upload_mib:g} MiB limit; biggest entries: {biggest}. Exclude them with "
                              f"--exclude PATTERN (or .rayignore), or raise --max-upload-mib")

    env_vars = {k: v for k, v in os.environ.items() if k in PASS_THROUGH_ENV or k.startswith(PASS_THROUGH_PREFIX)}
    env_vars.update(_parse_env(list(env)))
    # The driver's ray.init (ensure_ray) passes its own env_vars, which repeat some of these keys; without this,
    # Ray refuses to merge the job's runtime_env with the driver's ("conflict").
    env_vars.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    runtime_env: dict = {"working_dir": str(wd), "excludes": all_excludes}
    runtime_env["env_vars"] = env_vars
    if pip:
        reqs: list[str] = []
        for spec in pip:
            if Path(spec).is_file() and spec.endswith(".txt"):
                reqs += [ln.strip() for ln in Path(spec).read_text().splitlines()
                         if ln.strip() and not ln.lstrip().startswith("#")]
            else:
                reqs.append(spec)
        runtime_env["pip"] = reqs

    entry = ["props-ray", "run", rel.as_posix()]
    for o in overrides:
        entry += ["--set", o]
    entrypoint = shlex.join(entry)

    warnings = []
    if not Path(cfg.output_dir).is_absolute():
        warnings.append(f"output_dir {cfg.output_dir!r} is relative: on the cluster it resolves inside the job's "
                        f"temporary working dir on the head node and is lost with it; use an absolute path on "
                        f"shared storage, e.g. --set output_dir=/mnt/shared/runs")
    uri = cfg.tracking.tracking_uri or env_vars.get("MLFLOW_TRACKING_URI")
    if not uri:
        warnings.append("no MLflow tracking server given (MLFLOW_TRACKING_URI or tracking.tracking_uri): the job "
                        "would track to sqlite:///mlflow.db inside its temporary working dir on the head node")
    elif uri.startswith(("http://127.0.0.1", "http://localhost")):
        warnings.append(f"the tracking URI {uri} is a loopback address: it must answer on the head node, where the "
                        f"job's driver runs")

    sid = submission_id or f"props-ray-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    return Submission(entrypoint, runtime_env, re.sub(r"[^A-Za-z0-9_.-]", "-", sid), cfg, warnings)


# -- following a job -------------------------------------------------------------

def _stream_logs(client, sid: str, out) -> None:
    """Follow the job's logs until it ends: the websocket tail, else polling."""
    async def tail():
        async for chunk in client.tail_job_logs(sid):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
        return
    except Exception as err:  # noqa: BLE001 - e.g. a proxy without websockets: fall back to polling
        print(f"(log tail stopped: {err}; polling instead)", file=sys.stderr)
    seen = 0
    while True:
        status = str(client.get_job_status(sid))
        try:
            logs = client.get_job_logs(sid)
        except Exception:  # noqa: BLE001
            logs = ""
        if len(logs) > seen:
            out.write(logs[seen:])
            out.flush()
            seen = len(logs)
        if status in TERMINAL:
            return
        time.sleep(2)


def wait_for(client, sid: str, timeout: float = 60.0) -> str:
    """The job's status once terminal (the log tail can end a moment before the status is written)."""
    deadline = time.time() + timeout
    status = str(client.get_job_status(sid))
    while status not in TERMINAL and time.time() < deadline:
        time.sleep(1)
        status = str(client.get_job_status(sid))
    return status


def submit(args) -> int:
    from ray.job_submission import JobSubmissionClient

    try:
        sub = build_submission(args.job, args.overrides, working_dir=args.working_dir, env=args.env, pip=args.pip,
                               excludes=args.exclude, submission_id=args.submission_id,
                               max_upload_mib=args.max_upload_mib)
    except SubmitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for w in sub.warnings:
        print(f"warning: {w}", file=sys.stderr)
    trials = sub.cfg.trials()
    print(f"{args.job}: valid job '{sub.cfg.name}' with {len(trials)} trial(s)", flush=True)

    client = JobSubmissionClient(args.address)
    t0 = time.time()
    sid = client.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env, submission_id=sub.submission_id,
                            metadata={"props_ray.job": sub.cfg.name})
    addr = getattr(client, "_address", args.address) or args.address
    print(f"submitted {sid} to {addr}\n  entrypoint: {sub.entrypoint}", flush=True)
    if args.no_wait:
        print(f"  follow: ray job logs -f {sid} --address {addr}\n  status: ray job status {sid} --address {addr}\n"
              f"  stop:   ray job stop {sid} --address {addr}")
        return 0
    try:
        _stream_logs(client, sid, sys.stdout)
        status = wait_for(client, sid)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the job keeps running. Stop it with: ray job stop {sid} --address {addr}",
              file=sys.stderr)
        return 130
    info = client.get_job_info(sid)
    msg = f" ({info.message})" if getattr(info, "message", None) and status != "SUCCEEDED" else ""
    print(f"\njob {sid} {status}{msg} after {time.time() - t0:.1f}s", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def add_arguments(p) -> None:
    p.add_argument("--address", default=None,
                   help="the cluster's dashboard, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or "
                        "$RAY_ADDRESS)")
    p.add_argument("--no-wait", action="store_true", help="submit and return without following the logs")
    p.add_argument("--working-dir", default=None, help="directory uploaded as the job's working dir (default: .)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the job (repeatable); MLFLOW_TRACKING_URI and PROPS_RAY_* are "
                        "passed through when set")
    p.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                   help="pip requirement or requirements .txt file to install in the job's runtime_env "
                        "(repeatable; default none: the cluster image is expected to have props-ray installed)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="further gitignore-style pattern to leave out of the upload (repeatable)")
    p.add_argument("--submission-id", default=None)
    p.add_argument("--max-upload-mib", type=float, default=MAX_UPLOAD_MIB,
                   help=f"refuse to upload a working dir larger than this (default {MAX_UPLOAD_MIB}; 0 disables)")


__all__ = ["ConfigError", "SubmitError", "Submission", "build_submission", "submit", "add_arguments"]
