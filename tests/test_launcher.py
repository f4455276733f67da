"""The sweep launcher (sempa_exp.launch.launcher) without a cluster: which runs a launch submits, skips or waits for,
how it reports them, and a real 2-run sweep through ``hydra/launcher=submitit_local`` (submitit's local executor, one
process per run) then its relaunch, which recomputes nothing and hands Hydra the same values, also from archived
records on a fresh runs directory. The SLURM side (job arrays, preemption, cancellation) is test_slurm.py's, with a
real cluster."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, RunMode
from omegaconf import OmegaConf
from submitit.core.utils import UncompletedJobError

from conftest import TINY_OVERRIDES
from sempa_exp.config.location import CONF_DIR
from sempa_exp.config.registry import register_all
from sempa_exp.launch import launcher
from sempa_exp.launch.launcher import PlannedRun, SweepError, SweepLauncherMixin, job_marker
from sempa_exp.records import identity
from sempa_exp.records.archive import archive
from sempa_exp.records.results import Results, ResultsError, RunKind, read_results, sweep_objective, write_results

# The smallest tiny run: 16 pairs = 2 optimizer steps, one checkpoint, STS-B dev at the end only.
SMALL_RUN = [*(o for o in TINY_OVERRIDES if not o.startswith("data.size")), "data.size=16", "eval.at_start=[]",
             "eval.at_checkpoint=[]", "eval.at_end=[stsb_dev]", "run.num_threads=1"]


@pytest.fixture(autouse=True)
def _no_hydra_state_left():
    """What a test's in-process Hydra launch leaves behind must not rename the runs of later tests (run names read
    HydraConfig when it is set)."""
    yield
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def _no_poll_wait(monkeypatch):
    monkeypatch.setattr(launcher, "POLL_S", 0.0)


@pytest.fixture
def sweep_args(data_root, tmp_path):
    def make(*overrides: str) -> list[str]:
        return [*SMALL_RUN, "hydra/launcher=submitit_local", f"paths.data_dir={data_root}",
                f"paths.runs_dir={tmp_path / 'runs'}", *overrides]

    return make


def multirun(overrides: list[str], task_function) -> list[JobReturn]:
    """``python -m sempa_exp.train -m <overrides>``, in this process: the job returns Hydra's sweeper gets."""
    register_all()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="train"):
        (batch,) = GlobalHydra.instance().hydra.multirun(config_name="config", task_function=task_function,
                                                          overrides=overrides, with_log_configuration=False)
    return list(batch)


def local_launcher(overrides: list[str]) -> SweepLauncherMixin:
    """The launcher Hydra sets up for a multirun with these overrides (nothing is submitted)."""
    register_all()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="train"):
        hydra = GlobalHydra.instance().hydra
        cfg = hydra.compose_config("config", overrides, run_mode=RunMode.MULTIRUN)
        context = HydraContext(config_loader=hydra.config_loader, callbacks=None)
        made = Plugins.instance().instantiate_launcher(hydra_context=context, task_function=lambda c: None,
                                                       config=cfg)
    # Hydra's plugin scan imports the plugin module afresh: compared by name, not class identity
    assert type(made).__name__ == "LocalLauncher" and isinstance(made, SweepLauncherMixin)
    return made


# ------------------------------------------------------------------------------------- plan: what is submitted


def test_plan_names_the_run_dir_and_skips_only_a_finished_run(sweep_args, tmp_path):
    job = sweep_args("run.group=plan", "trainer.learning_rate=3e-4")
    planner = local_launcher(job)
    plan = planner._plan(job, 7)
    # the directory the run itself will use: named by the overrides that change what it computes
    joined = plan.config.hydra.job.override_dirname
    assert "trainer.learning_rate=3e-4" in joined and "data.size=16" in joined
    assert not [k for k in ("paths.", "logger", "run.group", "run.num_threads", "hydra") if k in joined]
    assert plan.run_dir == tmp_path / "runs" / "plan" / identity.name_from_overrides(joined)
    assert plan.index == 7 and plan.label == f"plan/{plan.run_dir.name}" and plan.skip_reason is None

    record = Results(kind=RunKind.TRAINING, group="plan", name=plan.run_dir.name, run_dir=str(plan.run_dir),
                     method="sempa", status="unfinished")
    plan.run_dir.mkdir(parents=True)
    write_results(plan.run_dir, record)  # e.g. gen_eval's record of one of its checkpoints
    assert planner._plan(job, 7).skip_reason is None
    record.status, record.final = "finished", {"eval/stsb_dev": 61.25}
    write_results(plan.run_dir, record)
    skipped = planner._plan(job, 7)
    assert skipped.skip_reason == "already finished" and skipped.run_dir == plan.run_dir
    ret = planner._skipped_return(skipped)
    assert ret.status is JobStatus.COMPLETED and ret.return_value == sweep_objective(record) == 61.25
    # run.skip_finished=false reruns it (the name leaves the flag out: the same directory)
    again = planner._plan([*job, "run.skip_finished=false"], 7)
    assert again.skip_reason is None and again.run_dir == plan.run_dir
    (plan.run_dir / "results.json").write_text("{damaged")  # never taken for "not finished", never resubmitted
    with pytest.raises(ResultsError, match="is damaged"):
        planner._plan(job, 7)


# --------------------------------------------------------------------------- earlier jobs of the same sweep


class StubSlurmLauncher(SweepLauncherMixin):
    _EXECUTOR = "slurm"
    params = {"name": "sempa-lr"}


def planned(tmp_path: Path, index: int, skip: str | None = None) -> PlannedRun:
    return PlannedRun(index, [f"trainer.learning_rate={index}e-4"], OmegaConf.create({"hydra": {"job": {
        "name": "train"}}}), tmp_path / "runs" / "lr" / f"r{index}", skip)


def mark(plan: PlannedRun, job_id: str, executor: str = "slurm", name: str = "sempa-lr") -> None:
    marker = job_marker(plan.run_dir)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"job_id": job_id, "name": name, "executor": executor,
                                  "folder": str(plan.run_dir.parent / ".hydra" / "%j")}))


def test_a_run_still_queued_from_an_earlier_launch_is_waited_for_not_resubmitted(tmp_path, monkeypatch, caplog):
    plans = [planned(tmp_path, i, skip="already finished" if i == 3 else None) for i in range(6)]
    mark(plans[0], "12_0")  # queued or running: waited for
    mark(plans[1], "12_1")  # its id is in the queue under another name (the cluster's ids restarted)
    mark(plans[2], "11_2")  # ended: submitted again
    mark(plans[3], "12_3")  # finished (skipped): nothing to wait for
    mark(plans[4], "12_4", executor="local")  # a local job of an earlier launch: not SLURM's
    # plans[5]: never submitted
    queue = {"12_0": "sempa-lr", "12_1": "someone-else", "12_3": "sempa-lr", "12_4": "sempa-lr"}
    monkeypatch.setattr(launcher, "active_slurm_jobs", lambda: queue)
    StubSlurmLauncher()._find_earlier_jobs(plans)
    earlier = [p.earlier_job for p in plans]
    assert isinstance(earlier[0], submitit.SlurmJob) and earlier[0].job_id == "12_0"
    assert earlier[1:] == [None] * 5

    for p in plans:
        p.earlier_job = None
    monkeypatch.setattr(launcher, "active_slurm_jobs", lambda: None)  # squeue failed
    with caplog.at_level(logging.WARNING, logger=launcher.__name__):
        StubSlurmLauncher()._find_earlier_jobs(plans)
    assert [p.earlier_job for p in plans] == [None] * 6
    assert "cannot tell whether earlier jobs of this sweep are still running" in caplog.text

    monkeypatch.setattr(launcher, "active_slurm_jobs", lambda: pytest.fail("squeue asked for a local sweep"))
    local = StubSlurmLauncher()
    local._EXECUTOR = "local"
    local._find_earlier_jobs(plans)
    assert [p.earlier_job for p in plans] == [None] * 6


# -------------------------------------------------------------------------- waiting for jobs, the report


class FakeJob:
    """A submitit job as _wait sees it: not done for ``pending_polls`` looks, then a result or an exception."""

    def __init__(self, job_id: str, outcome: JobReturn | None = None, error: Exception | None = None,
                 state: str = "COMPLETED", pending_polls: int = 0) -> None:
        self.job_id, self.state, self.outcome, self.error = job_id, state, outcome, error
        self.pending_polls = pending_polls
        self.paths = SimpleNamespace(stderr=Path(f"/logs/{job_id}_0_log.err"))

    def done(self) -> bool:
        self.pending_polls -= 1
        return self.pending_polls < 0

    def results(self) -> list[JobReturn]:
        if self.error is not None:
            raise self.error
        return [self.outcome]


def job_return(status: JobStatus, value) -> JobReturn:
    ret = JobReturn(overrides=[], status=status)
    ret.return_value = value
    return ret


class StubLocalLauncher(SweepLauncherMixin):
    """launch() with the plans and jobs given: _plan and _submit are the parts that need Hydra and submitit."""

    _EXECUTOR = "local"

    def __init__(self, plans: list[PlannedRun], jobs: dict[int, FakeJob]) -> None:
        self.plans, self.jobs, self.submitted = plans, jobs, []

    def _plan(self, overrides, index):
        return self.plans[index]

    def _submit(self, todo):
        self.submitted += [p.index for p in todo]
        return [self.jobs[p.index] for p in todo]


def finished(plan: PlannedRun, sts_avg: float) -> PlannedRun:
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    write_results(plan.run_dir, Results(kind=RunKind.TRAINING, group="lr", name=plan.run_dir.name,
                                        run_dir=str(plan.run_dir), method="sempa", final={"eval/sts_avg": sts_avg}))
    return plan


def test_launch_waits_for_every_run_and_reports_each_by_name(tmp_path, capsys, caplog):
    plans = [planned(tmp_path, i) for i in range(6)]
    finished(plans[0], 70.0).skip_reason = "already finished"
    finished(plans[3], 66.0)  # its job is killed after the run wrote its results
    plans[5].earlier_job = FakeJob("5", job_return(JobStatus.COMPLETED, 64.0), pending_polls=1)
    failed_task = job_return(JobStatus.FAILED, ValueError("boom"))
    jobs = {
        1: FakeJob("1", job_return(JobStatus.COMPLETED, 65.0), pending_polls=2),
        2: FakeJob("2", error=UncompletedJobError("job 2 has not produced any output"), state="CANCELLED"),
        3: FakeJob("3", error=UncompletedJobError("no output"), state="TIMEOUT", pending_polls=1),
        4: FakeJob("4", failed_task),
    }
    stub = StubLocalLauncher(plans, jobs)
    with caplog.at_level(logging.WARNING, logger=launcher.__name__), pytest.raises(SweepError) as err:
        stub.launch([p.overrides for p in plans], 0)
    assert stub.submitted == [1, 2, 3, 4]  # neither the finished run nor the one an earlier launch holds
    assert str(err.value) == (
        "2 of 6 runs did not finish:\n"
        "  lr/r2 (job 2): CANCELLED (log: /logs/2_0_log.err)\n"
        "  lr/r4 (job 4): ValueError: boom (log: /logs/4_0_log.err)")
    assert "lr/r3: job 3 ended TIMEOUT after the run finished" in caplog.text
    summary = capsys.readouterr().out.split("sweep summary:\n")[1].splitlines()
    assert summary == [
        "  #0 lr/r0: skipped (already finished)",
        "  #1 lr/r1: finished",
        "  #2 lr/r2: NOT FINISHED: CANCELLED (log: /logs/2_0_log.err)",
        "  #3 lr/r3: finished",
        "  #4 lr/r4: NOT FINISHED: ValueError: boom (log: /logs/4_0_log.err)",
        "  #5 lr/r5: finished (job 5 of an earlier launch)"]


def test_a_job_that_stopped_with_a_user_message_is_reported_with_it(tmp_path, capsys):
    """A run that refuses to go on (a stalled requeue, a damaged record) exits with one line for the user and leaves
    no result: the sweep reports that line by run name, not only the job's state."""
    plans = [planned(tmp_path, i) for i in range(2)]
    stopped = FakeJob("0", error=UncompletedJobError("job 0 has not produced any output"), state="FAILED")
    stopped.paths.stderr = tmp_path / "0_0_log.err"
    stopped.paths.stderr.write_text("Traceback? no:\n[sempa-exp] error: /runs/lr/r0: the last 3 attempts all started "
                                    "from {'checkpoint': 0}\nsrun: error: task 0: Exited with exit code 2\n")
    silent = FakeJob("1", error=UncompletedJobError("no output"), state="FAILED")  # its log does not exist
    with pytest.raises(SweepError) as err:
        StubLocalLauncher(plans, {0: stopped, 1: silent}).launch([p.overrides for p in plans], 0)
    assert str(err.value).splitlines()[1:] == [
        "  lr/r0 (job 0): FAILED: /runs/lr/r0: the last 3 attempts all started from {'checkpoint': 0} "
        f"(log: {tmp_path / '0_0_log.err'})",
        "  lr/r1 (job 1): FAILED (log: /logs/1_0_log.err)"]
    assert "#0 lr/r0: NOT FINISHED: FAILED: /runs/lr/r0: the last 3" in capsys.readouterr().out


def test_a_launch_where_every_run_finishes_returns_their_values_in_order(tmp_path, capsys):
    plans = [planned(tmp_path, i) for i in range(3)]
    finished(plans[1], 70.0).skip_reason = "already finished"
    jobs = {0: FakeJob("0", job_return(JobStatus.COMPLETED, 61.0), pending_polls=3),
            2: FakeJob("2", job_return(JobStatus.COMPLETED, None))}  # a run without a finite score
    returns = StubLocalLauncher(plans, jobs).launch([p.overrides for p in plans], 0)
    assert [(r.status, r.return_value) for r in returns] == [
        (JobStatus.COMPLETED, 61.0), (JobStatus.COMPLETED, 70.0), (JobStatus.COMPLETED, None)]
    assert "NOT FINISHED" not in capsys.readouterr().out


# ------------------------------------------------------------------- a real sweep on submitit's local executor


def test_local_sweep_runs_each_job_once_and_a_relaunch_recomputes_nothing(sweep_args, tmp_path, capsys):
    from sempa_exp import train

    overrides = sweep_args("run.group=lr", "trainer.learning_rate=1e-4,3e-4", f"run.archive_to={tmp_path / 'records'}")
    first = multirun(overrides, train.main.__wrapped__)  # the function `python -m sempa_exp.train` hands Hydra
    out = capsys.readouterr().out
    assert "[sempa-exp] submitted 2 runs as local job(s)" in out
    group = tmp_path / "runs" / "lr"
    records = [read_results(d) for d in sorted(p for p in group.iterdir() if not p.name.startswith("."))]
    assert len(records) == 2 and all(r.finished and r.final_step == 2 for r in records)
    assert sorted(r.config["trainer"]["learning_rate"] for r in records) == [1e-4, 3e-4]
    records.sort(key=lambda r: r.config["trainer"]["learning_rate"])  # the sweep's order
    dirs = [Path(r.run_dir) for r in records]
    # what each job handed Hydra's sweeper: its run's sweep objective (STS-B dev here: no 7-task pass)
    assert [r.status for r in first] == [JobStatus.COMPLETED] * 2
    assert [r.return_value for r in first] == [sweep_objective(r) for r in records] == [
        r.final["eval/stsb_dev"] for r in records]
    markers = [json.loads(job_marker(d).read_text()) for d in dirs]
    assert [m["executor"] for m in markers] == ["local", "local"] and markers[0]["name"] == "sempa-lr"
    assert f"  #0 lr/{dirs[0].name}: finished" in out and f"  #1 lr/{dirs[1].name}: finished" in out

    submitit_dirs = set(group.glob(".hydra/sweep_*/.submitit"))
    states = {d: (d / "results.json").stat().st_mtime_ns for d in dirs}
    again = multirun(overrides, train.main.__wrapped__)
    out = capsys.readouterr().out
    assert "[sempa-exp] submitted" not in out and out.count("skipped (already finished)") == 2
    assert set(group.glob(".hydra/sweep_*/.submitit")) == submitit_dirs  # nothing submitted
    assert {d: (d / "results.json").stat().st_mtime_ns for d in dirs} == states
    # a skipped run hands the sweeper the value of the run that wrote its record
    assert [(r.status, r.return_value) for r in again] == [(r.status, r.return_value) for r in first]

    # a fresh machine: the runs directory is gone; each run archived its records when it finished (run.archive_to,
    # no weights), and they are copied back
    assert any(group.rglob("*.safetensors")) and not any((tmp_path / "records").rglob("*.safetensors"))
    kept = archive([group], tmp_path / "records")
    assert sorted(kept.unchanged) == sorted(f"lr/{d.name}" for d in dirs) and not kept.copied and not kept.refused
    shutil.rmtree(tmp_path / "runs")
    assert sorted(archive([tmp_path / "records"], tmp_path / "runs").copied) == sorted(kept.unchanged)
    restored = multirun(overrides, train.main.__wrapped__)
    out = capsys.readouterr().out
    assert "[sempa-exp] submitted" not in out and out.count("skipped (already finished)") == 2
    assert [(r.status, r.return_value) for r in restored] == [(r.status, r.return_value) for r in first]


def test_a_jobs_user_message_is_found_even_after_text_without_its_newline(tmp_path):
    """A signal handler's log line can land between a print's text and its newline: the message is found anywhere in
    a line, and the last one counts."""
    from sempa_exp.config.errors import USER_ERROR_PREFIX
    from sempa_exp.launch.launcher import user_error_in_log

    log = tmp_path / "0_log.out"
    log.write_text(f"{USER_ERROR_PREFIX}an earlier message\n{{'loss': '0.36'}}{USER_ERROR_PREFIX}the run's message\n"
                   "submitit INFO - Exiting\n")
    assert user_error_in_log(log) == "the run's message"
    assert user_error_in_log(tmp_path / "missing.out") is None
    log.write_text("no message\n")
    assert user_error_in_log(log) is None
