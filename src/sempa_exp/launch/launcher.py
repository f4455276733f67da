"""Hydra launchers for sweeps through submitit: hydra-submitit-launcher's, with what a long sweep on a cluster needs.

- A run whose results file says "finished" is not submitted again; it is reported as skipped.
- A run still queued or running from an earlier launch of the sweep (the client lost its connection, say) is not
  submitted a second time but waited for: each submitted run leaves ``<runs_dir>/<group>/.hydra/jobs/<run
  name>.json`` naming its SLURM job, checked against ``squeue`` on the next launch.
- The client waits for every job of the array and reports each run that did not finish by its run name, with the
  scheduler's state (CANCELLED, TIMEOUT, ...) and its log file, instead of stopping at the first failure.

Everything else (one job array per sweep, requeue on preemption/timeout with the same overrides through
``checkpoint()``) is hydra-submitit-launcher's. The options are ``hydra/launcher=submitit_slurm|submitit_local``
(schemas below; the classes are in ``hydra_plugins.sempa_exp_launcher``, the only place Hydra takes launchers
from); a ``cluster=`` profile selects the SLURM one and fills in the partition and resources.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, LocalQueueConf, SlurmQueueConf
from omegaconf import DictConfig, OmegaConf, open_dict

from sempa_exp.config.errors import USER_ERROR_PREFIX, reporting_user_errors
from sempa_exp.records import identity, rundir
from sempa_exp.records.results import is_finished, read_results, sweep_objective

log = logging.getLogger(__name__)

POLL_S = 5.0  # seconds between two looks at the jobs of a sweep


class SweepError(RuntimeError):
    """Some runs of a sweep did not finish; the message names each one."""


@dataclass
class SlurmLauncherConf(SlurmQueueConf):
    """``hydra/launcher=submitit_slurm``: the plugin's options with defaults for long, requeueable runs."""

    _target_: str = "hydra_plugins.sempa_exp_launcher.sempa_launcher.SlurmLauncher"
    name: str = "sempa-${run.group}"
    timeout_min: int = 60  # >= 60: submitit tells a preemption from a timeout only past 80% (or -10 min) of it
    signal_delay_s: int = 120  # USR2 this long before the time limit: the job requeues itself
    max_num_timeout: int = 20  # requeues after a timeout; preemptions are not counted
    setup: list[str] = field(default_factory=list)  # shell lines run first, e.g. "export WANDB_MODE=offline"


@dataclass
class LocalLauncherConf(LocalQueueConf):
    """``hydra/launcher=submitit_local``: the same sweep machinery on this machine, one process per run."""

    _target_: str = "hydra_plugins.sempa_exp_launcher.sempa_launcher.LocalLauncher"
    name: str = "sempa-${run.group}"
    timeout_min: int = 600


def register_launcher_configs() -> None:
    """Replaces the plugin's ``submitit_slurm``/``submitit_local`` options with these (same names, same keys).

    Hydra's plugin discovery, once per process, re-executes the plugin's config module, which registers its own
    options again: discovery is run here first, so that ours are registered last.
    """
    Plugins.instance()
    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="submitit_slurm", node=SlurmLauncherConf, provider="sempa_exp")
    cs.store(group="hydra/launcher", name="submitit_local", node=LocalLauncherConf, provider="sempa_exp")


def check_finished_run(cfg: DictConfig, run_dir: Path) -> None:
    """A finished run is skipped only if it is this experiment: the same config sections and the same data by content
    (what the entry point checks before its own skip); anything else is refused, naming what differs."""
    from sempa_exp.pipelines import evaluation, training
    from sempa_exp.records.results import RunKind, kind_of_config

    job = cfg.copy()
    with open_dict(job):  # the job's own config, as Hydra hands it to the entry point
        del job["hydra"]
    kind = kind_of_config(OmegaConf.to_container(job, resolve=True))
    prep = (evaluation if kind == RunKind.EVALUATION else training).prepare(job)
    identity.check_same_experiment(run_dir, prep.resolved, kind)
    identity.check_same_data(run_dir, prep.data_identity)


def job_marker(run_dir: Path) -> Path:
    return run_dir.parent / ".hydra" / "jobs" / f"{run_dir.name}.json"


def active_slurm_jobs() -> dict[str, str] | None:
    """Queued and running SLURM jobs, id ("12_3": array tasks expanded) -> job name; None if squeue cannot tell."""
    try:
        out = subprocess.run(["squeue", "--noheader", "--array", "--format=%i|%j"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return dict(line.strip().split("|", 1) for line in out.stdout.splitlines() if "|" in line)


@dataclass
class PlannedRun:
    index: int
    overrides: list[str]
    config: DictConfig
    run_dir: Path
    skip_reason: str | None = None  # set: not submitted, nothing to wait for
    earlier_job: Any = None  # set: the job of an earlier launch still holds this run; waited for, not resubmitted

    @property
    def label(self) -> str:
        return f"{self.run_dir.parent.name}/{self.run_dir.name}"


def user_error_in_log(log: Path) -> str | None:
    """The last one-line message a job's run gave the user before it exited (see config.errors), if any. Looked for
    anywhere in a line: a signal handler's log line can land between a print's text and its newline."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    return next((line.split(USER_ERROR_PREFIX, 1)[1] for line in reversed(lines) if USER_ERROR_PREFIX in line), None)


class SweepLauncherMixin:
    """``launch()`` for hydra-submitit-launcher's launchers: skip done runs, wait for all, report by run name."""

    _EXECUTOR: str

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        with reporting_user_errors():  # a run that cannot be planned (a bad run.group, a damaged record) is named
            plans = [self._plan(list(overrides), initial_job_idx + i) for i, overrides in enumerate(job_overrides)]
        self._find_earlier_jobs(plans)
        returns: dict[int, JobReturn] = {}
        for p in plans:
            if p.skip_reason:
                log.info("#%d %s: %s, not submitted", p.index, p.label, p.skip_reason)
                returns[p.index] = self._skipped_return(p)
            elif p.earlier_job is not None:
                print(f"[sempa-exp] #{p.index} {p.label}: still queued or running as {self._EXECUTOR} job "
                      f"{p.earlier_job.job_id} of an earlier launch; waiting for it", flush=True)
        todo = [p for p in plans if not p.skip_reason and p.earlier_job is None]
        waiting = [(p, p.earlier_job) for p in plans if p.earlier_job is not None]
        if todo:
            waiting = list(zip(todo, self._submit(todo), strict=True)) + waiting
        failures: list[str] = []
        for plan, job, outcome in self._wait(waiting):
            returns[plan.index] = outcome
            if outcome.status != JobStatus.COMPLETED:
                failures.append(f"{plan.label} (job {job.job_id}): {outcome._return_value}")
        self._report(plans, returns)
        if failures:
            raise SweepError(f"{len(failures)} of {len(plans)} runs did not finish:\n  " + "\n  ".join(failures))
        return [returns[p.index] for p in plans]

    def _plan(self, overrides: list[str], index: int) -> PlannedRun:
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        run_dir = identity.run_dir(cfg)
        skip = "already finished" if cfg.run.skip_finished and is_finished(run_dir) else None
        if skip:
            check_finished_run(cfg, run_dir)
        return PlannedRun(index, overrides, cfg, run_dir, skip)

    def _find_earlier_jobs(self, plans: list[PlannedRun]) -> None:
        """A run that an earlier launch of the sweep has queued or running is waited for, not submitted twice."""
        if self._EXECUTOR != "slurm":
            return
        marked = {p.index: json.loads(job_marker(p.run_dir).read_text()) for p in plans
                  if not p.skip_reason and job_marker(p.run_dir).exists()}
        if not marked:
            return
        active = active_slurm_jobs()
        if active is None:
            log.warning("squeue failed: cannot tell whether earlier jobs of this sweep are still running")
            return
        import submitit

        for p in plans:
            marker = marked.get(p.index, {})
            # the name too: job ids restart when a cluster's state is wiped
            if marker.get("executor") == "slurm" and active.get(marker["job_id"]) == marker.get("name"):
                p.earlier_job = submitit.SlurmJob(folder=marker["folder"], job_id=marker["job_id"])

    def _skipped_return(self, plan: PlannedRun) -> JobReturn:
        """The JobReturn of a run whose results file says finished."""
        ret = JobReturn(overrides=plan.overrides, cfg=plan.config, task_name=plan.config.hydra.job.name,
                        status=JobStatus.COMPLETED)
        ret.return_value = sweep_objective(read_results(plan.run_dir))
        return ret

    def _executor(self) -> Any:
        import submitit

        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        if self._EXECUTOR == "slurm":
            # --requeue explicitly: preemption and `scontrol requeue` must not depend on the cluster's JobRequeue
            extra = dict(params.get("additional_parameters") or {})
            if extra.pop("requeue", True):
                extra["requeue"] = True
            else:  # requeue=false: sbatch's own spelling, not "--requeue=False"
                extra["no_requeue"] = True
            params["additional_parameters"] = extra
        common = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in common else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        return executor

    def _submit(self, todo: list[PlannedRun]) -> list[Any]:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("submitit '%s' sweep dir: %s", self._EXECUTOR, sweep_dir)
        for p in todo:
            log.info("\t#%d : %s", p.index, " ".join(filter_overrides(p.overrides)))
        args = [(p.overrides, "hydra.sweep.dir", p.index, f"job_id_for_{p.index}", Singleton.get_state())
                for p in todo]
        jobs = self._executor().map_array(self, *zip(*args, strict=True))
        for p, job in zip(todo, jobs, strict=True):
            marker = job_marker(p.run_dir)
            marker.parent.mkdir(parents=True, exist_ok=True)
            rundir.write_json_atomic(marker, {"job_id": job.job_id, "name": self.params["name"],
                                              "executor": self._EXECUTOR,
                                              "folder": self.params["submitit_folder"], "sweep_dir": str(sweep_dir),
                                              "submitted": time.time()})
        print(f"[sempa-exp] submitted {len(jobs)} runs as {self._EXECUTOR} job(s) "
              f"{', '.join(j.job_id for j in jobs)}; submitit logs in {jobs[0].paths.folder.parent}", flush=True)
        return jobs

    def _wait(self, waiting: list[tuple[PlannedRun, Any]]) -> Iterator[tuple[PlannedRun, Any, JobReturn]]:
        """Yields (plan, job, JobReturn) as jobs end; a job that produced no result becomes a FAILED JobReturn.

        On SLURM a job has ended when ``squeue`` no longer lists it: submitit reports a job done as soon as its result
        file exists, while its process is still exiting (a ``scancel`` then would record a finished run as
        CANCELLED), and never reports done a job that left no record at all (a pending array task cancelled before
        it started: neither squeue nor sacct knows it, submitit says UNKNOWN forever). Both are decided here by
        squeue, looked at once per poll."""
        from submitit.core.utils import UncompletedJobError

        pending = list(waiting)
        unknown_once: set[str] = set()  # jobs seen gone and UNKNOWN at the previous look
        while pending:
            queued = active_slurm_jobs() if self._EXECUTOR == "slurm" else None
            still = []
            for plan, job in pending:
                listed = queued is not None and job.job_id in queued
                if not job.done():
                    if queued is not None and not listed and job.state == "UNKNOWN":
                        if job.job_id in unknown_once:  # twice in a row: not a lag of the accounting
                            outcome = JobReturn(overrides=plan.overrides, cfg=plan.config, status=JobStatus.FAILED)
                            outcome.return_value = SweepError(
                                "VANISHED: neither squeue nor sacct knows the job (cancelled while pending?); "
                                "relaunch the sweep to submit the run again")
                            yield plan, job, outcome
                            continue
                        unknown_once.add(job.job_id)
                    else:
                        unknown_once.discard(job.job_id)
                    still.append((plan, job))
                    continue
                if listed:  # its result is written, its process not gone yet (or it was requeued)
                    still.append((plan, job))
                    continue
                try:
                    outcome = job.results()[0]  # task 0's JobReturn; other ranks return the same or nothing
                except Exception as exc:  # no result: cancelled, timed out, killed, node failure, ...
                    detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                    reason = job.state if isinstance(exc, UncompletedJobError) else f"{job.state}: {detail}"
                    told = user_error_in_log(Path(job.paths.stderr))
                    if told:  # the run stopped itself with a message for the user (its process exited, no result)
                        reason = f"{job.state}: {told}"
                    if is_finished(plan.run_dir):  # killed after writing its results: the run is complete
                        log.warning("%s: job %s ended %s after the run finished", plan.label, job.job_id, reason)
                        outcome = self._skipped_return(plan)
                    else:
                        outcome = JobReturn(overrides=plan.overrides, cfg=plan.config, status=JobStatus.FAILED)
                        outcome.return_value = SweepError(f"{reason} (log: {job.paths.stderr})")
                else:
                    if outcome.status == JobStatus.FAILED:
                        outcome.return_value = SweepError(f"{type(outcome._return_value).__name__}: "
                                                          f"{outcome._return_value} (log: {job.paths.stderr})")
                yield plan, job, outcome
            pending = still
            if pending:
                time.sleep(POLL_S)

    def _report(self, plans: list[PlannedRun], returns: dict[int, JobReturn]) -> None:
        lines = []
        for p in plans:
            ret = returns[p.index]
            if p.skip_reason:
                state = f"skipped ({p.skip_reason})"
            elif ret.status != JobStatus.COMPLETED:
                state = f"NOT FINISHED: {ret._return_value}"
            elif p.earlier_job is not None:
                state = f"finished (job {p.earlier_job.job_id} of an earlier launch)"
            else:
                state = "finished"
            lines.append(f"  #{p.index} {p.label}: {state}")
        print("[sempa-exp] sweep summary:\n" + "\n".join(lines), flush=True)
