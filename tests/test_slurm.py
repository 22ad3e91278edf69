"""``search --executor``: workers as a SLURM job array, or as local processes, via submitit.

The SLURM tests run a real one-node cluster (munged, slurmctld and slurmd on 127.0.0.1, from
a slurm.conf written for the session) against PostgreSQL and a real ``mlflow server``. The
journal test runs two local workers on one journal file. Workers use one thread each:
two torch processes with a thread per core on a 2-core machine run five times slower.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cloudpickle
import optuna
import psutil
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from mapnet_tune.config import load_study
from mapnet_tune.errors import UserError
from mapnet_tune.names import PARENT_ATTR
from mapnet_tune.storage import FINISHED, is_surplus
from mapnet_tune.study.request import SearchRequest
from mapnet_tune.study.slurm import _executor, _shareable
from mapnet_tune.study.submission import Submission, parse_slurm_time
from mapnet_tune.study.task import WorkerTask
from tests.conftest import (
    MlflowServer,
    free_port,
    mid_training,
    polled_study,
    study_runs,
    unavailable,
    until,
    write_study,
)

CLI = Path(sys.executable).parent / "mapnet-tune"
HEARTBEAT = ["--heartbeat-interval", "1", "--grace-period", "5"]
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "scancel", "scontrol")
MUNGE_BINARIES = ("munged", "mungekey")


class SlurmCluster:
    """munged, slurmctld and slurmd for one node on 127.0.0.1, everything under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        """Start the daemons and wait until the node is idle.

        Raises:
            RuntimeError: With the daemon's log when one does not come up.
        """
        key, sock = self.root / "munge.key", self.root / "munge.socket"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        key.chmod(0o600)
        self._daemon(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",  # the socket lives under a tmp folder that others can read
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={self.root / 'munged.pid'}",
                f"--seed-file={self.root / 'munged.seed'}",
                f"--log-file={self.root / 'munged.log'}",
            ],
        )
        self._wait(sock.exists, 20, "munged", "its socket")
        node = socket.gethostname().split(".")[0]
        self.conf.write_text(self._config(node, sock))
        for d in ("state", "spool"):
            (self.root / d).mkdir()
        self._daemon("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._daemon("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", node])
        self._wait(lambda: self.sinfo() == "idle", 60, "slurmd", "the node to be idle")

    def _config(self, node: str, munge_socket: Path) -> str:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        lines = {
            "ClusterName": "mapnet-test",
            # slurmctld serves only where this names its own host.
            "SlurmctldHost": f"{node}(127.0.0.1)",
            "SlurmctldPort": free_port(),
            "SlurmdPort": free_port(),
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={munge_socket}",
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "StateSaveLocation": self.root / "state",
            "SlurmdSpoolDir": self.root / "spool",
            "SlurmctldPidFile": self.root / "slurmctld.pid",
            "SlurmdPidFile": self.root / "slurmd.pid",
            "SlurmctldLogFile": self.root / "slurmctld.log",
            "SlurmdLogFile": self.root / "slurmd.log",
            # No cgroups: the test machine may be a container.
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "MpiDefault": "none",
            "ReturnToService": 2,
            "SchedulerType": "sched/backfill",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "AccountingStorageType": "accounting_storage/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "JobCompType": "jobcomp/none",
            # scancel sends SIGTERM, then SIGKILL this long after: time to re-queue a trial.
            "KillWait": 30,
            "NodeName": f"{node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} "
            f"RealMemory={int(memory_mb * 0.9)} State=UNKNOWN",
            "PartitionName": "debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        }
        return "".join(f"{key}={value}\n" for key, value in lines.items())

    def _daemon(self, name: str, argv: list[str]) -> None:
        out = open(self.root / f"{name}.out", "wb")  # noqa: SIM115 (the daemon keeps it)
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs.append(
            subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        )
        out.close()

    def _wait(self, check, timeout: float, name: str, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            if check():
                return
            time.sleep(0.5)
        logs = [self.root / f"{name}.out", self.root / f"{name}.log"]
        tail = " | ".join(p.read_text()[-600:] for p in logs if p.exists())
        raise RuntimeError(f"{name} did not come up ({what}): {tail}")

    def run(self, *argv: str, **env: str) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster, with ``env`` added."""
        env = {**os.environ, "SLURM_CONF": str(self.conf), **env}
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)

    def sinfo(self) -> str:
        """The node's state."""
        return self.run("sinfo", "--noheader", "--format=%T").stdout.strip()

    def queue(self, job: str) -> dict[str, str]:
        """Task id -> state, for the tasks of ``job`` that are queued or running."""
        out = self.run("squeue", "--noheader", "--array", "--jobs", job, "--format=%i %T").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def stop(self) -> None:
        """Cancel every job, then stop the daemons, munged last."""
        if self.conf.exists():
            self.run("scancel", f"--user={os.getuid()}")
            deadline = time.monotonic() + 45  # KillWait, and a little
            while time.monotonic() < deadline and self.run("squeue", "--noheader").stdout:
                time.sleep(1)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster; clients find it through SLURM_CONF, which jobs inherit."""
    if os.geteuid() != 0:
        unavailable("SLURM", "the test cluster runs its daemons as root; run the tests as root")
    missing = [b for b in (*SLURM_BINARIES, *MUNGE_BINARIES) if shutil.which(b) is None]
    if missing:
        unavailable(
            "SLURM",
            f"{', '.join(missing)} not on PATH; apt-get install slurmctld slurmd slurm-client "
            f"munge",
        )
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        cluster.stop()
        unavailable("SLURM", str(exc))
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved
    cluster.stop()


def _search(
    workdir: Path, cfg: Path, study: str, trials: int, storage: str, tracking_uri: str, *extra
) -> subprocess.CompletedProcess:
    """``mapnet-tune search ... --executor ...`` as a user types it, with a clean environment."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "MAPNET_TUNE_STORAGE")
    }
    env["MAPNET_TUNE_CACHE"] = str(workdir / "cache")
    if "local" not in extra:
        # The one-node cluster does not bind tasks to CPUs: as docs/deploy.md advises.
        env["OMP_NUM_THREADS"] = "1"
    else:
        env.pop("OMP_NUM_THREADS", None)  # local workers get their share from mapnet-tune
    argv = [str(CLI), "search", "--config", str(cfg), "--study", study, "--trials", str(trials)]
    argv += ["--storage", storage, "--tracking-uri", tracking_uri, *HEARTBEAT, *extra]
    return subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


def _finished(trials: list) -> list:
    return [t for t in trials if t.state in FINISHED]


def _check_runs(client: MlflowClient, study: optuna.Study, children: int) -> list:
    """One parent run, the study's; ``children`` trial runs, none left RUNNING."""
    parents, runs = study_runs(client, study.study_name)
    assert [p.info.run_id for p in parents] == [study.user_attrs[PARENT_ATTR]]
    assert len(runs) == children
    assert all(r.info.status != "RUNNING" for r in runs)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in runs)
    return runs


def _last_trial(log: str) -> int:
    """The trial a task's log shows it training last."""
    return int(re.findall(r"t(\d{4}) epoch", log)[-1])


@pytest.mark.slurm
@pytest.mark.slow
def test_job_array_completes_the_study(slurm, servers, tmp_path):
    storage, server = servers
    cfg = write_study(tmp_path / "tiny.yaml")
    args = ("--executor", "slurm", "--workers", "2", "--wait")
    done = _search(tmp_path, cfg, "array", 4, storage, server.url, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    array = re.search(r"as SLURM job array (\d+) \(tasks (\S+), (\S+)\)", done.stdout)
    assert array and array.group(2, 3) == (f"{array[1]}_0", f"{array[1]}_1"), done.stdout
    assert "mapnet-tune status --study array" in done.stdout
    assert "study array: 4 complete" in done.stdout  # the table, once the study completed

    folder = tmp_path / ".mapnet-tune" / "slurm" / array[1]
    script = (folder / f"{array[1]}_submission.sh").read_text()
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --signal=USR1@120" in script
    for task in (0, 1):
        assert f"job_id={array[1]}_{task}," in (folder / f"{array[1]}_{task}_0_log.out").read_text()
        assert "study complete" in (folder / f"{array[1]}_{task}_0_log.err").read_text()
    # The job files hold no store address: the tasks read them from their environment.
    for pickle in folder.glob("*_submitted.pkl"):
        assert storage.encode() not in pickle.read_bytes()
        assert server.url.encode() not in pickle.read_bytes()

    study = polled_study(storage, "array")
    trials = study.get_trials()
    assert len(_finished(trials)) == 4 and len({t.number for t in _finished(trials)}) == 4
    assert all(is_surplus(t) for t in trials if t.state == TrialState.FAIL)
    runs = _check_runs(MlflowClient(server.url), study, 4)
    assert {r.info.run_id for r in runs} == {
        t.user_attrs["mlflow_run_id"] for t in _finished(trials)
    }


@pytest.mark.slurm
@pytest.mark.slow
def test_stopped_tasks_queue_their_trials_again(slurm, servers, tmp_path):
    storage, server = servers
    cfg = write_study(tmp_path / "long.yaml", train={"epochs": 40})
    args = ("--executor", "slurm", "--workers", "2", "--slurm-requeue")
    done = _search(tmp_path, cfg, "stopped", 4, storage, server.url, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    array = re.search(r"SLURM job array (\d+)", done.stdout)[1]
    folder = tmp_path / ".mapnet-tune" / "slurm" / array

    def both_early() -> bool:
        # One trial finished (a task whose study made no progress is not requeued), and both
        # tasks are early in their next trials.
        mid = mid_training(storage, "stopped")
        if len(mid) < 2 or any(len(t.intermediate_values) >= 25 for t in mid):
            return False
        return len(_finished(polled_study(storage, "stopped").get_trials())) >= 1

    until(both_early, 180, "both tasks mid-trial after a first trial finished")
    # What scancel and preemption send (SIGTERM), and what SLURM sends before the time limit.
    assert slurm.run("scancel", f"{array}_0").returncode == 0
    assert slurm.run("scancel", "--signal=USR1", f"{array}_1").returncode == 0
    until(lambda: slurm.queue(array) == {f"{array}_1": "PENDING"}, 60, "task 1 requeued")
    # SLURM holds a requeued job back for two minutes; let it start now.
    assert slurm.run("scontrol", "update", f"JobId={array}_1", "StartTime=now").returncode == 0
    until(lambda: not slurm.queue(array), 240, "the job array to end")

    first = (folder / f"{array}_0_0_log.err").read_text()
    second = (folder / f"{array}_1_0_log.err").read_text()
    assert "stopped by SIGTERM; the running trial, if any, is queued again" in first
    requeued = "stopped by SIGUSR1 before the time limit; requeueing this task"
    assert requeued in second and "study complete" in second.split(requeued)[1]

    study = polled_study(storage, "stopped")
    trials = study.get_trials()
    assert len(_finished(trials)) == 4
    stopped = [t for t in trials if t.state == TrialState.FAIL and not is_surplus(t)]
    assert {t.number for t in stopped} == {
        _last_trial(first),
        _last_trial(second.split(requeued)[0]),
    }
    client = MlflowClient(server.url)
    for trial in stopped:
        retry = next(t for t in trials if t.user_attrs.get("retry_of") == trial.number)
        assert retry.state in FINISHED and retry.params == trial.params
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED"
        assert "re-queued" in run.data.tags["mapnet_tune.end_reason"]
    _check_runs(client, study, 4 + len(stopped))


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_refusal_is_one_line(slurm, servers, tmp_path):
    storage, server = servers
    cfg = write_study(tmp_path / "tiny.yaml")
    args = ("--executor", "slurm", "--slurm-partition", "nosuchpartition")
    done = _search(tmp_path, cfg, "refused", 2, storage, server.url, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: sbatch refused the job array (sbatch: error: ")
    assert "Invalid partition name" in line and line.endswith(
        "check --slurm-partition, --slurm-time, --slurm-gpus-per-worker and --slurm-option"
    )


@pytest.mark.slurm
@pytest.mark.slow
def test_mlflow_server_job_writes_where_it_listens(slurm, tmp_path):
    uri_file = tmp_path / "mlflow-uri"
    script = Path(__file__).parent.parent / "deploy" / "slurm" / "mlflow-server.sbatch"
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # the venv, as if activated
    done = slurm.run(
        "sbatch", "--chdir", str(tmp_path), str(script), PATH=path, MLFLOW_URI_FILE=str(uri_file)
    )
    assert done.returncode == 0, done.stderr
    job = re.search(r"Submitted batch job (\d+)", done.stdout)[1]
    try:
        uri = until(lambda: uri_file.exists() and uri_file.read_text().strip(), 60, "the URI")
        assert re.fullmatch(r"http://[\w.-]+:\d+", uri)

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    return True
            except OSError:
                return False

        until(healthy, 120, f"the MLflow server at {uri}")
        assert (tmp_path / "mlartifacts" / "mlflow.db").exists()
    finally:
        slurm.run("scancel", job)


@pytest.fixture
def sqlite_mlflow(tmp_path):
    """A real ``mlflow server`` on an SQLite file: one server process may write SQLite."""
    server = MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
def test_local_workers_share_a_journal_file(tmp_path, workdir, cli, sqlite_mlflow):
    cfg = write_study(tmp_path / "long.yaml", train={"epochs": 30})
    relative = "journal:///study.log"  # the tasks get the absolute path
    storage = f"journal:///{tmp_path}/study.log"
    args = ("--executor", "local", "--workers", "2")
    done = _search(tmp_path, cfg, "journal", 4, relative, sqlite_mlflow.url, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"--storage {storage}" in done.stdout
    pids = re.search(r"local processes ([\d, ]+)", done.stdout)[1].split(", ")
    controllers = [psutil.Process(int(pid)) for pid in pids]
    try:
        # A worker killed mid-trial falls silent in the journal; the other fails and retries
        # its trial (Optuna's journal storage has no heartbeats: mapnet-tune adds them).
        lost = until(lambda: mid_training(storage, "journal"), 120, "a trial mid-training")[0]
        owner = next(
            c for c in controllers if f"t{lost.number:04d} epoch" in _local_log(tmp_path, c.pid)
        )
        # The workers split this machine's CPUs between them instead of each taking all.
        if not torch.cuda.is_available():
            share = max(1, len(os.sched_getaffinity(0)) // 2)
            assert f"training on the CPU with {share} thread" in _local_log(tmp_path, owner.pid)
        owner.children()[0].send_signal(signal.SIGKILL)
        until(lambda: not any(map(_alive, controllers)), 240, "the workers to finish")
    finally:
        for controller in filter(_alive, controllers):
            controller.terminate()  # each re-queues its trial and stops

    study = polled_study(storage, "journal")
    trials = study.get_trials()
    assert len(_finished(trials)) == 4
    failed = [t for t in trials if t.state == TrialState.FAIL and not is_surplus(t)]
    assert [t.number for t in failed] == [lost.number]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
    assert [t.state for t in retries] == [TrialState.COMPLETE]
    client = MlflowClient(sqlite_mlflow.url)
    run = client.get_run(lost.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "no heartbeat" in run.data.tags["mapnet_tune.end_reason"]
    _check_runs(client, study, 5)

    # The commands that read studies take the journal too.
    result = cli("status", "--study", "journal", "--storage", relative)
    assert result.exit_code == 0 and "study journal: 4 complete" in result.output
    result = cli("export-best", "--study", "journal", "--storage", relative)
    assert result.exit_code == 0 and "params:" in result.output


@pytest.mark.slow
def test_wait_says_when_every_worker_stopped_short(tmp_path, sqlite_mlflow):
    cfg = write_study(tmp_path / "tiny.yaml")
    args = ("--executor", "local", "--workers", "2", "--wait", "--timeout", "1s")
    done = _search(tmp_path, cfg, "short", 4, "journal:///short.log", sqlite_mlflow.url, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: all 2 workers stopped before study 'short' reached 4")
    assert "read their logs in" in error and "run the same command to continue" in error
    logs = (tmp_path / ".mapnet-tune" / "slurm").glob("local-*/*_0_log.err")
    assert all("time limit reached" in log.read_text() for log in logs)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _local_log(workdir: Path, pid: int) -> str:
    found = list((workdir / ".mapnet-tune" / "slurm").glob(f"local-*/{pid}_0_log.err"))
    return found[0].read_text() if found else ""


# Mistakes a user can make: one line naming the option and the fix, status 2.


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "2"], "--workers needs --executor slurm (or local)"),
        (["--wait"], "--wait needs --executor"),
        (["--slurm-time", "4h"], "--slurm-time needs --executor"),
        (["--executor", "slurm", "--gpus", "0,1"], "--gpus does not go with --executor"),
        (
            ["--executor", "slurm", "--slurm-option", "account"],
            "'account' must look like KEY=VALUE",
        ),
        (["--executor", "slurm", "--slurm-option", "=x"], "'=x' must look like KEY=VALUE"),
        (["--executor", "slurm", "--slurm-option", "array=0-3"], "use --workers instead"),
        (["--executor", "slurm", "--slurm-time", "90"], "'90' is not a duration"),
        (["--executor", "slurm", "--slurm-time", "4 hours"], "'4 hours' is not a duration"),
        (["--executor", "local", "--slurm-partition", "gpu"], "is for --executor slurm"),
        (["--executor", "local"], "--executor local needs a shared Optuna storage, not SQLite"),
        (
            ["--executor", "local", "--storage", "journal:///study.log"],
            "--executor local needs an MLflow tracking server, not SQLite",
        ),
    ],
)
def test_bad_executor_options_exit_2(workdir, cli, args, message):
    cfg = write_study(workdir / "tiny.yaml")
    line = _one_error_line(cli("search", "--config", cfg, *args))
    assert message in line
    assert not (workdir / "optuna.db").exists() and not (workdir / ".mapnet-tune").exists()


def test_slurm_without_sbatch_exit_2(workdir, cli, monkeypatch):
    cfg = write_study(workdir / "tiny.yaml")
    monkeypatch.setenv("PATH", str(workdir))
    line = _one_error_line(cli("search", "--config", cfg, "--executor", "slurm"))
    assert "--executor slurm needs SLURM's sbatch and srun on PATH" in line
    assert "--executor local" in line


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("4h", 4 * 3600),
        ("30m", 1800),
        ("1d12h", 36 * 3600),
        ("1h30m", 5400),
        ("04:00:00", 4 * 3600),
        ("90:00", 5400),  # SLURM's MM:SS
        ("1-12:00:00", 36 * 3600),
        ("2-0", 48 * 3600),  # SLURM's D-HH
    ],
)
def test_slurm_time_reads_our_and_slurms_formats(text, seconds):
    assert parse_slurm_time(text) == seconds


@pytest.mark.parametrize("text", ["90", "", "0m", "4x", "1:2:3:4"])
def test_slurm_time_refuses_ambiguous_or_bad_durations(text):
    with pytest.raises(UserError, match="is not a duration"):
        parse_slurm_time(text)


def test_sbatch_script_carries_the_options(tmp_path):
    if shutil.which("srun") is None:
        unavailable("SLURM", "srun is not on PATH; apt-get install slurm-client")
    sub = Submission(
        executor="slurm",
        workers=8,
        folder=str(tmp_path / "%A"),
        partition="gpu",
        time_s=4 * 3600,
        gpus_per_worker=1,
        options={"account": "lab", "mem": "32G"},
        requeue=True,
    )
    script = _executor(sub, "drive")._make_submission_file_text("CMD", "uid")
    for line in (
        "--job-name=mapnet-drive",
        "--partition=gpu",
        "--time=240",
        "--gpus-per-node=1",
        "--signal=USR1@120",
        "--requeue",
        "--account=lab",
        "--mem=32G",
    ):
        assert f"#SBATCH {line}\n" in script, script
    short = Submission(executor="slurm", folder=str(tmp_path / "%A"), time_s=120)
    assert "#SBATCH --signal=USR1@60\n" in _executor(short, "s")._make_submission_file_text(
        "C", "u"
    )


def test_worker_task_holds_no_secret(tmp_path):
    req = SearchRequest(
        study=load_study(write_study(tmp_path / "tiny.yaml")),
        study_name="tiny",
        storage="postgresql+psycopg2://optuna:s3cret@db.internal/optuna",
        tracking_uri="http://worker:pa55@mlflow.internal:5000",
        trials=8,
        enqueue=Path("best.yaml"),
        source="data/DRIVE",
    )
    first, other = _shareable(req, first=True), _shareable(req, first=False)
    blob = cloudpickle.dumps(WorkerTask(first))
    assert b"s3cret" not in blob and b"pa55" not in blob
    assert first.tracking_uri is None and "***" in first.storage
    assert first.enqueue == Path("best.yaml").resolve() and other.enqueue is None
    assert Path(first.source).is_absolute()
