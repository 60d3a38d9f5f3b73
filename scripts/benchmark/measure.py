"""What a measured phase costs: wall time, the generator's CPU, the server's CPU and memory
(from /proc), and what the rest of the machine used meanwhile."""
import os
import resource
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
SATURATED = 0.9             # a process above this share of one core is called saturated


def proc_cpu_seconds(pid):
    """utime + stime of a process, in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_busy_seconds():
    """CPU seconds the whole machine has spent busy (all CPUs, every process and interrupt)."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def self_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """Wall time, generator CPU and server CPU (user and system) over a measured phase."""

    def __init__(self, server_pids):
        self.pids = list(server_pids)
        self.start()

    def _server(self):
        user = system = 0.0
        for pid in self.pids:
            u, s = proc_cpu_seconds(pid)
            user, system = user + u, system + s
        return user, system

    def start(self):
        self.t0, self.g0, self.s0 = time.monotonic(), self_cpu_seconds(), self._server()
        self.m0 = machine_busy_seconds()
        self.stopped = None

    def stop(self):
        t, g, s = time.monotonic(), self_cpu_seconds(), self._server()
        machine = machine_busy_seconds() - self.m0
        wall = max(t - self.t0, 1e-9)
        user, system = s[0] - self.s0[0], s[1] - self.s0[1]
        # What neither the server nor the generator used: other tenants, kernel threads and
        # softirq work charged to nobody. High values mean a noisy measurement.
        others = max(0.0, machine - (g - self.g0) - (user + system if self.pids else 0))
        self.stopped = {
            "wall_s": round(wall, 3),
            "gen_cpu": round((g - self.g0) / wall, 3),
            "server_cpu": round((user + system) / wall, 3) if self.pids else None,
            "server_sys_share": round(system / (user + system), 3) if self.pids and
            user + system > 0 else None,
            "other_cpu": round(others / wall, 3),
            "_server_cpu_s": user + system,
        }
        return self.stopped


def percentile(sorted_values, fraction):
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, int(round(fraction * len(sorted_values))) - 1))
    return sorted_values[index]
