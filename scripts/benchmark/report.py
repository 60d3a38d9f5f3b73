"""The closing table, the goals it checks the figures against, and py-spy summaries."""
import statistics

from .measure import SATURATED

# What the issue asks of one BunPulse worker on this 2-core machine (checked only at full size).
GOALS = {
    "fanout": ("deliveries_per_s", ">=", 150000, {"subscribers": 1000}),
    "latency": ("p99_ms", "<", 15.0, {"subscribers": 1000, "rate": 20}),
    "connections": ("kib_per_connection", "<=", 15.0, {"connections": 10000}),
    "http": ("publishes_per_s", ">=", 3000, {}),
    "presence": ("subscriptions_per_s", ">=", 1000, {}),
}

HEADLINE = {"fanout": ("deliveries_per_s", "deliveries/s"), "latency": ("p99_ms", "p99 ms"),
            "connections": ("kib_per_connection", "KiB/conn"),
            "http": ("publishes_per_s", "publishes/s"),
            "presence": ("subscriptions_per_s", "joins/s")}


def verdict(result):
    goal_of = GOALS.get(result["scenario"])
    if goal_of is None:
        return ""
    field, op, goal, conditions = goal_of
    value = result.get(field)
    if value is None or any(result.get(k) != v for k, v in conditions.items()):
        return "-"
    ok = value >= goal if op == ">=" else value <= goal if op == "<=" else value < goal
    return f"{'met' if ok else 'MISSED'} ({op}{goal})"


def print_table(groups):
    header = ("scenario", "size", "headline", "value", "runs", "gen cpu", "srv cpu", "exact",
              "target")
    rows = [header]
    for results in groups:
        first = results[0]
        name = first["scenario"]
        field, label = HEADLINE[name]
        values = [r.get(field) for r in results if r.get(field) is not None]
        value = statistics.median(values) if values else None
        size = {"fanout": f"{first.get('subscribers')} subs",
                "latency": f"{first.get('subscribers')} subs @{first.get('rate') or 0:g}/s",
                "connections": f"{first.get('connections')} conns",
                "http": f"{first.get('clients')} clients",
                "presence": f"{first.get('clients')} clients/{first.get('channels')} ch"}[name]
        med = dict(first, **{field: value})
        gen = statistics.median([r.get("gen_cpu") or 0 for r in results])
        srv = [r.get("server_cpu") for r in results if r.get("server_cpu") is not None]
        rows.append((name, size, label, "-" if value is None else f"{value:g}",
                     str(len(results)), f"{gen:.0%}" + (" SAT" if gen >= SATURATED else ""),
                     f"{statistics.median(srv):.0%}" if srv else "-",
                     "yes" if all(r.get("exact") for r in results) else "NO", verdict(med)))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


def summarize_profile(path, top=25):
    """py-spy's raw (collapsed) output: the functions where the samples are (self), and the
    ones they pass through (total)."""
    self_time, total_time, samples = {}, {}, 0
    with open(path) as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            count = int(count)
            samples += count
            frames = stack.split(";")
            leaf = frames[-1]
            self_time[leaf] = self_time.get(leaf, 0) + count
            for frame in set(frames):
                total_time[frame] = total_time.get(frame, 0) + count
    if not samples:
        return "no samples\n"
    lines = [f"{samples} samples", "self%  function"]
    for frame, count in sorted(self_time.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * count / samples:5.1f}  {frame}")
    lines.append("total%  function")
    for frame, count in sorted(total_time.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * count / samples:5.1f}  {frame}")
    return "\n".join(lines) + "\n"


