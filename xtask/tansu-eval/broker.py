"""Start/stop a private tansu broker for the evaluation (never the stack's 9092)."""
import atexit
import os
import signal
import socket
import subprocess
import time


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Broker:
    """One tansu process on 127.0.0.1:<port>, restartable, logging to <workdir>/tansu.log."""

    def __init__(self, port, storage, workdir, cluster="tansu_eval"):
        assert port != 9092, "never the shared broker"
        self.port, self.storage, self.workdir, self.cluster = port, storage, workdir, cluster
        os.makedirs(workdir, exist_ok=True)
        self.proc = None
        self.log = open(os.path.join(workdir, "tansu.log"), "ab")
        atexit.register(self.kill)

    def kill(self):
        """Leaves no broker behind when the driver exits (even by an exception)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def start(self, timeout=30):
        if port_open(self.port):
            raise RuntimeError(f"127.0.0.1:{self.port} is already taken")
        env = {k: v for k, v in os.environ.items()
               if k not in ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "CLUSTER_ID")}
        url = f"tcp://127.0.0.1:{self.port}"
        self.log.write(f"\n==== start {time.strftime('%H:%M:%S')} ====\n".encode())
        self.log.flush()
        self.proc = subprocess.Popen(
            [os.path.expanduser("~/.cargo/bin/tansu"), "broker", "--cluster-id", self.cluster,
             "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", self.storage],
            cwd=self.workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while not port_open(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited {self.proc.returncode}; see {self.workdir}/tansu.log")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError("tansu did not open its port")
            time.sleep(0.05)
        return time.monotonic()

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc is None:
            return
        self.log.write(f"\n==== signal {sig} {time.strftime('%H:%M:%S')} ====\n".encode())
        self.log.flush()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        while port_open(self.port):
            time.sleep(0.05)
