"""Submit the pipeline to a running Ray cluster as a Ray job; list, follow and stop jobs.

`transferline submit --address http://HEAD:8265 CONFIG [key=value ...]` validates the config
here, then hands Ray's `JobSubmissionClient` the entrypoint `python -m pipeline run CONFIG ...`
with the project folder as `working_dir` (the cluster's image or environment provides the
dependencies; `--pip` asks Ray to install them in a runtime environment instead). Secrets
travel as runtime-env variables taken from this shell, by name; their values are never printed
nor put in the config.

A head started with `ray start --head` (Ray >= 2.5x) wants a token: it is read from
`RAY_AUTH_TOKEN`, the file `RAY_AUTH_TOKEN_PATH` names, or `~/.ray/auth_token` (where Ray
writes it), and sent as a bearer header.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import shlex
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from pipeline.config import ConfigError, load_config

# Passed to the job when set in this shell: credentials the pipeline's libraries read.
SECRET_ENV_VARS = (
    "WANDB_API_KEY", "HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "GOOGLE_APPLICATION_CREDENTIALS",
)
AGENT_WAIT_S = 60.0
#: Seconds each request to the dashboard may wait for an answer (`--timeout`).
REQUEST_TIMEOUT_S = 30.0
# Never uploaded with the working_dir (Ray also skips what .gitignore lists).
UPLOAD_EXCLUDES = [".git", ".venv", "runs", "wandb", "__pycache__", ".pytest_cache", "*.egg-info"]


class SubmitError(RuntimeError):
    """A problem reaching or using the cluster, in one line."""


def find_auth_token(env: Mapping[str, str] | None = None, home: Path | None = None) -> tuple[str | None, str]:
    """`(token, where it came from)`; `(None, reason)` when there is none to send."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file():
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH names {path}, which does not exist")
        return path.read_text().strip() or None, str(path)
    default = (home or Path.home()) / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip() or None, str(default)
    return None, "no token found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"


@contextmanager
def _explained(address: str, token_source: str, has_token: bool, timeout: float) -> Iterator[None]:
    """Ray's multi-line authentication and connection errors as one line that says what to do."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except requests.exceptions.Timeout:
        raise SubmitError(f"the Ray dashboard at {address} did not answer within {timeout:g} s (--timeout); "
                          "is that address a Ray dashboard (http://HEAD:8265), and is the head up?") from None
    except requests.exceptions.RequestException as e:
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: {type(e).__name__}") from None
    except AuthenticationError as e:
        if has_token:
            raise SubmitError(f"the Ray cluster at {address} refused the token from {token_source} "
                              "(token authentication): it is not this cluster's token") from None
        raise SubmitError(f"the Ray cluster at {address} requires an authentication token and {token_source}; "
                          "set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a copy of the head's "
                          "~/.ray/auth_token (`ray get-auth-token` on the head prints it)") from None
    except ConnectionError as e:
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: {str(e).splitlines()[0]}") from None
    except RuntimeError as e:  # the SDK's "Request failed with status code 404: ..." and the like
        raise SubmitError(f"{address}: {str(e).strip().splitlines()[0]}") from None


def _bounded_client(timeout: float):
    """`JobSubmissionClient` whose every HTTP request gives up after `timeout` seconds without an
    answer: Ray's SDK passes none, so a dashboard that accepts and never answers hangs it forever."""
    from ray.job_submission import JobSubmissionClient

    class BoundedClient(JobSubmissionClient):
        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", timeout)
            return super()._do_request(method, endpoint, **kwargs)

    return BoundedClient


class Cluster:
    """A `JobSubmissionClient` whose errors come out as `SubmitError` lines."""

    def __init__(self, address: str | None, timeout: float = REQUEST_TIMEOUT_S) -> None:
        if timeout <= 0:
            raise ConfigError(f"--timeout: must be > 0 seconds, got {timeout:g}")
        self.timeout = timeout
        logging.getLogger("ray").setLevel(logging.WARNING)  # not a line per file packaged
        address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
        if not address:
            raise SubmitError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard) "
                              "or set RAY_ADDRESS")
        token, self.token_source = find_auth_token()
        self.address, self.has_token = address, token is not None
        headers = {"Authorization": f"Bearer {token}"} if token else None
        with self.explained():
            self.client = _bounded_client(timeout)(address, headers=headers)

    def explained(self):
        return _explained(self.address, self.token_source, self.has_token, self.timeout)


def project_requirements() -> list[str]:
    """transferline's own dependencies (no extras), for a pip runtime environment."""
    try:
        reqs = importlib.metadata.requires("transferline") or []
    except importlib.metadata.PackageNotFoundError:
        raise SubmitError("--pip needs transferline installed here (pip install -e .) to read its "
                          "dependencies") from None
    return [r for r in reqs if "extra ==" not in r]


def job_spec(config: str, overrides: list[str], *, command: str, working_dir: Path, pip: bool,
             env_names: list[str], env: Mapping[str, str] | None = None) -> tuple[str, dict]:
    """`(entrypoint, runtime_env)` for a validated config; config errors raise `ConfigError` here."""
    env = os.environ if env is None else env
    cfg = load_config(config, overrides, command=command)
    if not os.path.isabs(cfg.output_dir):
        raise ConfigError(f"output_dir: {cfg.output_dir!r} is relative: on the cluster it would land in the "
                          "job's temporary copy of the working_dir; give an absolute path on shared storage, "
                          "e.g. output_dir=/mnt/shared/runs/NAME")
    working_dir = working_dir.resolve()
    config_path = Path(config).resolve()
    if not config_path.is_relative_to(working_dir):
        raise ConfigError(f"<config>: {config} is outside the working_dir {working_dir}, which is what travels to "
                          "the cluster; put it inside or pass --working-dir")
    entrypoint = shlex.join([
        "python", "-m", "pipeline", command, config_path.relative_to(working_dir).as_posix(), *overrides])
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": list(UPLOAD_EXCLUDES)}
    names = list(dict.fromkeys([*SECRET_ENV_VARS, *env_names]))
    missing = [n for n in env_names if not env.get(n)]
    if missing:
        raise ConfigError(f"--env: {', '.join(missing)} not set in this shell")
    env_vars = relative_paths_base(cfg, Path.cwd())  # after the cheap checks: it reads the disk
    env_vars.update({n: env[n] for n in names if env.get(n)})
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if pip:
        runtime_env["pip"] = project_requirements()
    return entrypoint, runtime_env


def relative_paths_base(cfg, base: Path) -> dict[str, str]:
    """The job's environment for relative local paths: they resolve against `base`, the directory
    the user submits from (the job's copy of the working_dir has no data), so they must exist
    there, and the cluster's nodes must see them at the same absolute paths."""
    from braceexpand import braceexpand

    from pipeline.runner import PATH_BASE_ENV, absolutize

    resolved = absolutize(cfg, str(base))
    specs = [("pretrain.data.urls", cfg.pretrain.data.urls or "", resolved.pretrain.data.urls or "")]
    specs += [(f"pretrain.data.sources[{i}].urls", s.urls, r.urls)
              for i, (s, r) in enumerate(zip(cfg.pretrain.data.sources, resolved.pretrain.data.sources))]
    specs += [("finetune.init_from", cfg.finetune.init_from or "", resolved.finetune.init_from or "")]
    relative = False
    for key, spec, absolute in specs:
        for given, path in zip(spec.split("::"), absolute.split("::")):
            if given == path:
                continue  # absolute already, or a URL: the cluster's business
            relative = True
            missing = next((p for p in braceexpand(path) if not os.path.exists(p)), None)
            if missing:
                raise ConfigError(
                    f"{key}: {given!r} is a relative path, and {missing} does not exist: a job's relative paths "
                    f"resolve against the directory you submit from ({base}), which the cluster's nodes must see; "
                    "build the data first (`make data` for the demo's), or give absolute paths or URLs")
    sources = [t.data.source for t in [cfg.finetune, *cfg.finetune.targets]]
    if relative or sources != [t.data.source for t in [resolved.finetune, *resolved.finetune.targets]]:
        return {PATH_BASE_ENV: str(base)}
    return {}


def submit(address: str | None, config: str, overrides: list[str], *, command: str = "run", wait: bool = False,
           pip: bool = False, env_names: list[str] | None = None, working_dir: str | None = None,
           job_id: str | None = None, timeout: float = REQUEST_TIMEOUT_S, dry_run: bool = False) -> int:
    entrypoint, runtime_env = job_spec(config, overrides, command=command, working_dir=Path(working_dir or "."),
                                       pip=pip, env_names=list(env_names or []))
    if dry_run:
        env_names_only = ", ".join(sorted(runtime_env.get("env_vars", {}))) or "none"
        print(f"dry run: the config is valid; nothing was submitted\n  entrypoint: {entrypoint}\n"
              f"  working_dir: {runtime_env['working_dir']}\n  job environment (names): {env_names_only}\n"
              f"  pip: {'yes' if pip else 'no (the cluster provides the dependencies)'}\n"
              "  the job runs the data, target and checkpoint checks on the cluster before any training", flush=True)
        return 0
    cluster = Cluster(address, timeout)
    # A head that has just started answers "No available agent to submit job, please try again
    # later" until its job agent is up: retry that, briefly.
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            with cluster.explained():
                job = cluster.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                                submission_id=job_id, metadata={"transferline": "1"})
            break
        except SubmitError as e:
            if "try again later" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    from pipeline.runner import PATH_BASE_ENV

    job_env = dict(runtime_env.get("env_vars", {}))
    base = job_env.pop(PATH_BASE_ENV, None)
    passed = ", ".join(sorted(job_env)) or "none"
    print(f"submitted job {job} to {cluster.address}\n  entrypoint: {entrypoint}\n"
          f"  env from this shell (values not shown): {passed}", flush=True)
    if base:
        print(f"  relative paths resolve against {base} (the cluster's nodes must see it)", flush=True)
    if not wait:
        print(f"follow it with: transferline jobs logs --follow {job} --address {cluster.address}", flush=True)
        return 0
    return follow(cluster, job)


def follow(cluster: Cluster, job: str) -> int:
    """Stream a job's logs until it ends; exit status 0 only when it succeeded."""
    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for lines in cluster.client.tail_job_logs(job):
            sys.stdout.write(lines)
            sys.stdout.flush()

    try:
        with cluster.explained():
            asyncio.run(tail())
            status = cluster.client.get_job_status(job)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job} goes on (transferline jobs stop {job})", file=sys.stderr)
        return 130
    print(f"job {job}: {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def jobs_list(address: str | None, timeout: float = REQUEST_TIMEOUT_S) -> int:
    cluster = Cluster(address, timeout)
    with cluster.explained():
        jobs = cluster.client.list_jobs()
    jobs.sort(key=lambda j: j.start_time or 0)
    print(f"{'JOB':<36} {'STATUS':<10} ENTRYPOINT")
    for j in jobs:
        print(f"{j.submission_id or j.job_id or '-':<36} {j.status.value:<10} {j.entrypoint}")
    return 0


def jobs_logs(address: str | None, job: str, follow_logs: bool = False, timeout: float = REQUEST_TIMEOUT_S) -> int:
    cluster = Cluster(address, timeout)
    if follow_logs:
        return follow(cluster, job)
    with cluster.explained():
        sys.stdout.write(cluster.client.get_job_logs(job))
    return 0


def jobs_stop(address: str | None, job: str, timeout: float = REQUEST_TIMEOUT_S) -> int:
    cluster = Cluster(address, timeout)
    with cluster.explained():
        stopped = cluster.client.stop_job(job)
    print(f"job {job}: {'stop requested' if stopped else 'not running'}")
    return 0
