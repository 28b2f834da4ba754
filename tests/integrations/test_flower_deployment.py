"""invdefend's Flower app on Flower's *deployment* engine: a real SuperLink and two real SuperNodes on
loopback, started with Flower's own CLI as separate processes, and the app submitted with ``flwr run``.

Two rounds of FedAvg with every client's update protected by a ``GradientDefense`` and checked by
``GradientDefenseMod``; the ServerApp records every train reply it received (JSON), and the test checks
from that record that the server saw only verified, noised updates. A second test (its own deployment, one
round) makes one client train with a plain optimizer and checks that the server sees its reply marked as a
violation that the mod failed closed on, not silently accepted.

Every process is started with ``start_new_session`` and stopped, with its descendants, in a ``finally``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("flwr")

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "examples" / "flower_deployment"
BIN = Path(sys.executable).parent
# What the deployment runs: the three started here, and what the SuperLink and SuperNodes start themselves.
EXECUTABLES = ("flower-superlink", "flower-supernode", "flwr", "flower-superexec", "flwr-serverapp", "flwr-clientapp")
NUM_NODES = 2
CONNECTION = "invdefend-test"  # the SuperLink connection written into $FLWR_HOME/config.toml
STARTUP_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 80.0  # one `flwr run`; two rounds take about 35 s on 2 busy cores
# Short local training, explicit so that the expected step count is known: 128 samples / 32 x 1 epoch.
TRAINING = {"samples-per-client": 128, "batch-size": 32, "local-epochs": 1}
STEPS_PER_ROUND = 4


def _missing_executables() -> list[str]:
    return [name for name in EXECUTABLES if not (BIN / name).exists()]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all held open until every one is picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return f"--- {path.name} (last {chars} chars) ---\n{text[-chars:]}"


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux ``/proc``; elsewhere none, and the process group is killed)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class Proc:
    """A process started by the test, its log file, and how to end it (and everything it started)."""

    name: str
    popen: subprocess.Popen
    log: Path
    handle: IO[bytes]
    service: bool = True  # expected to run until the test stops it (SuperLink, SuperNodes)

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.popen.poll() is None

    def stop(self) -> None:
        """SIGTERM this process, its process group and its descendants (Flower starts SuperExec in a new
        session); SIGKILL whatever is left after a grace period."""
        pids = [self.popen.pid, *_descendants(self.popen.pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                os.killpg(self.popen.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.popen.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                continue
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and any(_pid_alive(p) for p in pids[1:]):
                time.sleep(0.1)
            if not any(_pid_alive(p) for p in pids[1:]):
                break
        self.handle.close()


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():  # a zombie has exited
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path("/proc").exists()


@dataclass
class Deployment:
    """A SuperLink and its SuperNodes on loopback, and a Flower config whose default connection is it."""

    root: Path
    env: dict[str, str]
    superlink_port: int
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, args: list[str], service: bool = True) -> Proc:
        """Start ``args`` (an executable next to this Python) with its output in ``logs/<name>.log``."""
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = log.open("wb")
        popen = subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=self.root, env=self.env, stdout=handle,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        proc = Proc(name, popen, log, handle, service)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        """The tails of every log, for assertion messages."""
        return "\n".join(_tail(p.log) for p in self.procs)

    def check_alive(self) -> None:
        """Fail now, with the logs, if the SuperLink or a SuperNode has exited."""
        for proc in self.procs:
            if proc.service and not proc.alive():
                pytest.fail(f"{proc.name} exited with code {proc.popen.returncode}\n{self.logs()}")

    def run_app(self, name: str, run_config: dict[str, Any], timeout: float = RUN_TIMEOUT_S) -> dict[str, Any]:
        """``flwr run --stream`` a copy of the app with ``run_config`` overrides; the ServerApp's record.

        Waits until the ServerApp has written its finished record and ``flwr run`` (whose log stream ends
        with the run) has exited with code 0.
        """
        app = self.root / name
        shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("__pycache__", "*.json"))
        out = self.root / f"{name}-record.json"
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in {**run_config, "out": str(out)}.items())
        cli = self.start(f"{name}-flwr-run", ["flwr", "run", str(app), CONNECTION, "--stream",
                                              "--run-config", overrides], service=False)
        deadline = time.monotonic() + timeout
        try:
            while cli.alive() and time.monotonic() < deadline:
                self.check_alive()
                time.sleep(0.5)
            record = json.loads(out.read_text()) if out.exists() else {}
            if cli.alive():
                pytest.fail(f"run {name!r} did not end within {timeout:.0f} s; record so far: {record}\n{self.logs()}")
            if cli.popen.returncode != 0 or not record.get("finished"):
                pytest.fail(f"run {name!r}: `flwr run` exited with code {cli.popen.returncode}, ServerApp record "
                            f"{'finished' if record.get('finished') else 'unfinished'}: {record}\n{self.logs()}")
            return record
        finally:
            cli.stop()

    def stop(self) -> None:
        """Stop every process, SuperNodes before the SuperLink."""
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """A SuperLink and ``NUM_NODES`` SuperNodes (``--insecure``, 127.0.0.1, free ports), all stopped after.

    One per test: stopping ``flwr run`` does not stop its run on the SuperLink, so a test that fails
    mid-run must not leave its ServerApp competing with the next test's.
    """
    if missing := _missing_executables():
        pytest.skip(f"Flower's CLI executables {missing} are not installed next to {sys.executable}")
    root = tmp_path
    superlink_port, *node_ports = _free_ports(1 + NUM_NODES)
    home = root / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{superlink_port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # Flower starts its helpers by name
        "OMP_NUM_THREADS": "1",
        "FLWR_HOME": str(home),  # the CLI's config, installed FABs: nothing in the user's ~/.flwr
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # no `uv sync`: the apps use this environment
        "PYTHONUNBUFFERED": "1",
    }
    dep = Deployment(root=root, env=env, superlink_port=superlink_port)
    try:
        link = dep.start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1",
                                       "--port", str(superlink_port), "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            dep.check_alive()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", superlink_port)) == 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"the SuperLink did not listen on port {superlink_port} within "
                            f"{STARTUP_TIMEOUT_S:.0f} s\n{_tail(link.log)}")
            time.sleep(0.3)
        for pid, port in enumerate(node_ports):
            dep.start(f"supernode-{pid}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{superlink_port}",
                "--host", "127.0.0.1", "--port", str(port),
                "--node-config", f"partition-id={pid} num-partitions={NUM_NODES}",
                "--max-wait-time", str(int(STARTUP_TIMEOUT_S)),
            ])
        yield dep
    finally:
        dep.stop()


def _protected(reply: dict[str, Any]) -> bool:
    """A reply the mod verified: no error, no fail-closed noise, every optimizer step after a noised release."""
    m = reply.get("invdefend", {})
    return ("error" not in reply and m.get("invdefend.mod-fallback") == 0 and m.get("invdefend.unprotected-steps") == 0
            and m.get("invdefend.protected-steps") == STEPS_PER_ROUND
            and m.get("invdefend.releases", 0) >= STEPS_PER_ROUND)


def test_two_rounds_on_the_deployment_engine_send_only_protected_updates(deployment: Deployment) -> None:
    """2 rounds x 2 SuperNodes: 4 train replies, each a verified update whose every step was noised."""
    record = deployment.run_app("protected", {**TRAINING, "num-server-rounds": 2})
    replies = record["replies"]
    logs = f"record: {json.dumps(record, indent=1)}\n{deployment.logs()}"
    assert len(replies) == 2 * NUM_NODES, logs
    assert sorted(r["round"] for r in replies) == [1, 1, 2, 2], logs
    for round_ in (1, 2):
        nodes = {r["node-id"] for r in replies if r["round"] == round_}
        clients = {r["invdefend"].get("invdefend.client-id") for r in replies if r["round"] == round_}
        assert len(nodes) == NUM_NODES and clients == set(range(NUM_NODES)), logs
    for r in replies:
        assert _protected(r), f"not a verified protected update: {r}\n{logs}"
        m = r["invdefend"]
        assert m["invdefend.round"] == r["round"], logs
        assert m["invdefend.relative-energy"] > 0.0, f"no noise energy recorded: {r}\n{logs}"
        assert m["invdefend.predicted-psnr-max"] < m["invdefend.undefended-predicted-psnr-max"], logs
        assert r["arrays-differ"] and r["arrays-max-abs-change"] > 0.0, logs
    for round_ in ("1", "2"):
        agg = record["rounds"][round_]["aggregated"]
        assert agg["invdefend.clients"] == NUM_NODES and agg["invdefend.mod-fallback"] == 0, logs


def test_a_client_training_without_the_defense_reaches_the_server_marked_by_the_mod(deployment: Deployment) -> None:
    """Partition 1 trains with a plain optimizer: the mod fails closed (noises the update) and marks it."""
    record = deployment.run_app("unprotected", {**TRAINING, "num-server-rounds": 1, "unprotected-partition": 1})
    replies = record["replies"]
    logs = f"record: {json.dumps(record, indent=1)}\n{deployment.logs()}"
    assert len(replies) == NUM_NODES, logs
    by_client = {r["invdefend"]["invdefend.client-id"]: r for r in replies if "invdefend" in r}
    assert set(by_client) == {0, 1}, logs
    assert _protected(by_client[0]), logs
    bad = by_client[1]["invdefend"]
    assert bad["invdefend.mod-fallback"] == 1, f"violation not marked: {by_client[1]}\n{logs}"
    assert bad["invdefend.unprotected-steps"] == STEPS_PER_ROUND and bad["invdefend.protected-steps"] == 0, logs
    assert by_client[1]["arrays-differ"], logs
    assert record["rounds"]["1"]["aggregated"]["invdefend.mod-fallback"] == 1, logs
