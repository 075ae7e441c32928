"""Aggregate per-run results into medians / min-max, and write markdown, PNG and JSON."""

import json
import statistics

from . import walltime


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def aggregate(runs, servers, workloads):
    """summary[server][workload] = dict of medians and ranges over the successful rounds."""
    summary = {}
    for s in servers:
        summary[s] = {}
        for w in workloads:
            ok = [r for r in runs if r["server"] == s and r["workload"] == w.name and r["ok"]]
            failed = [r for r in runs if r["server"] == s and r["workload"] == w.name
                      and not r["ok"]]
            if not ok:
                summary[s][w.name] = {"n": 0, "failed": len(failed)}
                continue
            vals = [r["value"] for r in ok]
            roles = sorted({role for r in ok for role in r["cpu"]})
            cpu = {role: _med([r["cpu"][role].get("us_per_req") for r in ok if role in r["cpu"]])
                   for role in roles}
            util = {role: _med([r["cpu"][role].get("cpu_util") for r in ok if role in r["cpu"]])
                    for role in roles}
            cswch = {role: _med([r["cpu"][role].get("cswch_per_req") for r in ok
                                 if role in r["cpu"]]) for role in roles}
            hwm = {role: max([r["rss_kib"][role]["vmhwm"] or 0 for r in ok]) for role in roles}
            sampled = {role: max([r["rss_kib"][role]["sampled_peak"] or 0 for r in ok])
                       for role in roles}
            summary[s][w.name] = {
                "n": len(ok), "failed": len(failed), "unit": w.unit,
                "median": _med(vals), "min": min(vals), "max": max(vals), "values": vals,
                "iops_median": _med([r["iops"] for r in ok]),
                "mbps_median": _med([r["mbps"] for r in ok]),
                "lat_p50_us_median": _med([_lat(r, "clat_p50_us") for r in ok]),
                "lat_p99_us_median": _med([_lat(r, "clat_p99_us") for r in ok]),
                "cpu_us_per_req": cpu, "cpu_util": util, "cswch_per_req": cswch,
                "vmhwm_kib_max": hwm, "sampled_rss_kib_max": sampled,
            }
            timings = [r["fio"]["timing"] for r in ok if r["fio"].get("timing")]
            if timings:
                summary[s][w.name].update(
                    overlap_median=_med([t["overlap"] for t in timings]),
                    overlap_min=min(t["overlap"] for t in timings),
                    not_overlapped=sum(not t["overlapped"] for t in timings),
                    fio_sum_iops_median=_med([r["fio"].get("fio_sum_iops") for r in ok]))
    return summary


def _lat(r, key):
    vals = [r["fio"][d][key] for d in ("read", "write") if d in r["fio"]]
    return max(vals) if vals else None


def best_floor(summary, workloads):
    """Per workload: (server name, median) of the better floor plugin thread model."""
    out = {}
    for w in workloads:
        cands = [(summary[s][w.name]["median"], s) for s in summary
                 if s.startswith("floor-") and summary[s][w.name].get("median")]
        out[w.name] = (max(cands)[1], max(cands)[0]) if cands else (None, None)
    return out


# ---- formatting ----------------------------------------------------------------------------

def fmt_val(v, unit):
    if v is None:
        return "–"
    if unit == "IOPS":
        return "%.1fk" % (v / 1000) if v >= 1000 else "%.0f" % v
    return "%.0f" % v if v >= 100 else "%.1f" % v


def fmt_range(e):
    """Median (min–max) of a summary entry; ⚠ when in some round the connections of a
    multi-connection workload did not run at once."""
    if not e.get("n"):
        return "failed" if e.get("failed") else "–"
    u = e["unit"]
    flag = " ⚠" if e.get("not_overlapped") else ""
    if e["n"] == 1:
        return fmt_val(e["median"], u) + flag
    return "%s (%s–%s)%s" % (fmt_val(e["median"], u), fmt_val(e["min"], u),
                             fmt_val(e["max"], u), flag)


def server_label(meta, name, plain=False):
    """A server's name for tables (code-quoted unless plain), marked when it is context (a
    reference that is not a peer of vblk, such as libblkio's io_uring driver on the file)."""
    spec = meta.get("server_specs", {}).get(name, {})
    text = name if plain else "`%s`" % name
    return text + " (context)" if spec.get("context") else text


def _gist(text):
    """First line of an error, plus its last non-empty line (e.g. the Python exception)."""
    lines = [line.strip() for line in (text or "?").splitlines() if line.strip()]
    if len(lines) > 1:
        return "%s … `%s`" % (lines[0], lines[-1])
    return lines[0] if lines else "?"


def _ratio(a, b):
    return "%.2f×" % (a / b) if a and b else "–"


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def multi_connection_section(meta, summary, servers, workloads, runs):
    """Report lines on the multi-connection workloads: how they were timed, each server's
    overlap, and every run whose connections did not run at once."""
    multi = [w for w in workloads if w.numjobs > 1]
    if not any(summary[s][w.name].get("overlap_min") is not None
               for s in servers for w in multi):
        return []
    rows = []
    for s in servers:
        cells = []
        for w in multi:
            e = summary[s][w.name]
            if e.get("overlap_min") is None:
                cells.append("–")
                continue
            cells.append("%.2f (%.2f)%s / %s" % (
                e["overlap_median"], e["overlap_min"], " ⚠" if e["not_overlapped"] else "",
                fmt_val(e.get("fio_sum_iops_median"), "IOPS")))
        rows.append([server_label(meta, s)] + cells)
    lines = ["## Several connections, by wall clock", "",
             "Throughput = all connections' requests / the time in which at least one of them "
             "was measuring (the union of fio's per-job intervals, each after its own ramp); "
             "server CPU per request is taken over that same time and total. Overlap = the time "
             "all connections were measuring at once / that time: below %.1f (⚠) the server "
             "took the connections in turn. fio's sum = the per-job IOPS added up (what "
             "`--group_reporting` reports), which counts connections served one after another "
             "as if served at once." % walltime.OVERLAP_MIN, "",
             _table(["server"] + ["%s: overlap median (min) / fio's sum" % w.label
                                  for w in multi], rows), ""]
    flagged = [r for r in runs if r.get("flags")]
    lines += ["- ⚠ round %s `%s` %s: %s" % (r.get("round", "?"), r["server"], r["workload"],
                                           "; ".join(r["flags"])) for r in flagged]
    return lines + ([""] if flagged else [])


def markdown(meta, summary, servers, workloads, skipped, runs):
    heads = ["server"] + ["%s (%s)" % (w.label, w.unit) for w in workloads]
    floor = best_floor(summary, workloads)
    has_floor = any(v[1] for v in floor.values())
    has_qsd = "qsd-nbd" in summary and any(summary["qsd-nbd"][w.name].get("median")
                                           for w in workloads)
    lines = ["# vblk benchmark %s%s" % (meta["timestamp"], " (quick)" if meta["quick"] else ""),
             ""]
    lines += ["- command: `%s`" % meta["command"],
              "- date: %s; host: %s, %s CPUs (%s), kernel %s"
              % (meta["date"], meta["hostname"], meta["ncpu"], meta["cpu_model"], meta["kernel"]),
              "- git: %s" % meta["git"],
              "- tools: %s" % "; ".join("%s" % v for v in meta["versions"].values()),
              "- image: %s, %d MiB of random data, in page cache"
              % (meta["image"], meta["image_size"] >> 20),
              "- fio nbd engine, %s s runtime + %s s ramp per run (time_based), %d round(s), "
              "servers run round robin, a fresh server per run; median (min–max) over rounds"
              % (meta["runtime"], meta["ramp"], meta["rounds"]),
              "- total wall time: %.0f s%s" % (meta.get("elapsed_s", 0),
                                                  " (interrupted)" if meta.get("interrupted")
                                                  else "")]
    others = [r["machine"]["other_cpus"] for r in runs if r.get("machine")]
    if others:
        lines.append("- other load on the machine during the measurement windows (CPU time of "
                     "everything but the server and fio, in CPUs): median %.2f, max %.2f; "
                     "%d of %d runs above 0.2" % (statistics.median(others), max(others),
                                                  sum(o > 0.2 for o in others), len(others)))
    lines.append("")
    versions = sorted({r["code_version"] for r in runs if r.get("code_version")})
    if len(versions) > 1:
        lines += ["**Warning: the vblk plugin / vblk_core sources changed during this "
                  "benchmark (%d versions: %s); vblk rows mix code versions.**"
                  % (len(versions), ", ".join(versions)), ""]
    elif versions:
        lines[-1:-1] = ["- vblk code version (sha1 of plugin + vblk_core sources): %s"
                        % versions[0]]
    if skipped:
        lines += ["**Skipped / failed servers:**", ""]
        lines += ["- `%s`: %s" % (s, _gist(why)) for s, why in skipped.items()]
        lines.append("")
    if meta["quick"]:
        lines += ["_Quick run: a smoke test of the harness, not a measurement._", ""]

    rows = []
    for s in servers:
        rows.append([server_label(meta, s)] + [fmt_range(summary[s][w.name]) for w in workloads])
    if has_floor:
        rows.append(["**floor** (best model)"] + [
            "%s (%s)" % (fmt_val(floor[w.name][1], w.unit), floor[w.name][0].split("-", 1)[1])
            if floor[w.name][0] else "–" for w in workloads])
    lines += ["## Throughput", "", "Median (min–max) over rounds; IOPS for 4 KiB, MB/s "
              "(10^6 bytes/s) for 1 MiB.", "", _table(heads, rows), ""]
    context = [s for s in servers if meta.get("server_specs", {}).get(s, {}).get("context")]
    if context:
        lines += ["%s: context, not a peer of vblk (what each is: *Servers* below)."
                  % ", ".join("`%s`" % s for s in context), ""]
    lines += multi_connection_section(meta, summary, servers, workloads, runs)

    for title, ref in (("vs the Python floor (best of the two thread models)", "floor"),
                       ("vs qemu-storage-daemon's NBD export", "qsd-nbd")):
        if ref == "floor" and not has_floor or ref == "qsd-nbd" and not has_qsd:
            continue
        rows = []
        for s in servers:
            cells = []
            for w in workloads:
                base = floor[w.name][1] if ref == "floor" else summary["qsd-nbd"][w.name].get(
                    "median")
                cells.append(_ratio(summary[s][w.name].get("median"), base))
            rows.append([server_label(meta, s)] + cells)
        lines += ["## Ratio of medians " + title, "", _table(heads, rows), ""]

    rows = []
    for s in servers:
        cells = []
        for w in workloads:
            e = summary[s][w.name]
            main = "qsd" if s.startswith("qsd-") else "nbdkit"
            v = (e.get("cpu_us_per_req") or {}).get(main)
            cells.append("%.1f" % v if v is not None else "–")
        rows.append([server_label(meta, s)] + cells)
    lines += ["## Server CPU per request (µs, median)", "",
              "utime+stime of the NBD server process (nbdkit; qemu-storage-daemon for `qsd-*`) "
              "over the steady-state window, divided by requests completed. For vblk the "
              "qemu-storage-daemon behind it is in the next table.", "",
              _table(["server"] + [w.label for w in workloads], rows), ""]
    rows = []
    for s in servers:
        cells = []
        for w in workloads:
            c = summary[s][w.name].get("cswch_per_req") or {}
            parts = ["%s %.2f" % (role, v) for role, v in sorted(c.items()) if v is not None]
            cells.append(", ".join(parts) or "–")
        rows.append([server_label(meta, s)] + cells)
    lines += ["## Context switches per request (median; a count of sleeps and wake-ups)", "",
              "Voluntary + involuntary switches of all threads of each server process over the "
              "steady-state window, divided by requests completed (`rt`'s device process is "
              "not counted).", "", _table(["server"] + [w.label for w in workloads], rows), ""]
    vblk = [s for s in servers if s.startswith("vblk-")]
    if vblk:
        rows = []
        for s in vblk:
            cells = []
            for w in workloads:
                c = summary[s][w.name].get("cpu_us_per_req") or {}
                if c.get("qsd") is None:
                    cells.append("–")
                else:
                    cells.append("%.1f (total %.1f)" % (c["qsd"], c["qsd"] + (c.get("nbdkit")
                                                                             or 0)))
            rows.append([server_label(meta, s)] + cells)
        lines += ["## vhost-user-blk back-end (qemu-storage-daemon) CPU per request (µs, median)",
                  "", _table(["server"] + [w.label for w in workloads], rows), ""]

    rows = []
    for s in servers:
        cells = []
        for w in workloads:
            e = summary[s][w.name]
            main = "qsd" if s.startswith("qsd-") else "nbdkit"
            h = (e.get("vmhwm_kib_max") or {}).get(main)
            p = (e.get("sampled_rss_kib_max") or {}).get(main)
            cells.append("%.0f (%.0f)" % (h / 1024, (p or 0) / 1024) if h else "–")
        rows.append([server_label(meta, s)] + cells)
    lines += ["## Peak RSS of the NBD server process (MiB)", "",
              "VmHWM at the end of the run (psutil-sampled peak in parentheses), max over rounds."
              " Only `memory` keeps image data in its own RSS; the others use the page cache.", "",
              _table(["server"] + [w.label for w in workloads], rows), ""]

    rows = []
    for s in servers:
        cells = []
        for w in workloads:
            e = summary[s][w.name]
            cells.append("%.0f / %.0f" % (e["lat_p50_us_median"], e["lat_p99_us_median"])
                         if e.get("n") else "–")
        rows.append([server_label(meta, s)] + cells)
    lines += ["## fio completion latency p50 / p99 (µs, median over rounds)", "",
              _table(["server"] + [w.label for w in workloads], rows), ""]

    if any(r.get("machine", {}).get("other_cpus", 0) > 0.2 for r in runs):
        rows = []
        for s in servers:
            cells = []
            for w in workloads:
                v = [r["machine"]["other_cpus"] for r in runs if r["server"] == s
                     and r["workload"] == w.name and r.get("machine")]
                cells.append("%.2f" % max(v) if v else "–")
            rows.append([server_label(meta, s)] + cells)
        lines += ["## Other load during the runs (CPUs, max over rounds)", "",
                  "CPU used by processes other than the server and fio during the measurement "
                  "window: above ~0.2 the run shared the machine and its numbers are suspect.",
                  "", _table(["server"] + [w.label for w in workloads], rows), ""]

    stat_rows = []
    for s in servers:
        cells, any_stats = [], False
        for w in workloads:
            per = []
            for r in runs:
                st = r.get("plugin_stats")
                if r["server"] != s or r["workload"] != w.name or not isinstance(st, dict):
                    continue
                t = st.get("totals") or {}
                if t.get("requests"):
                    per.append((t.get("kicks", 0) / t["requests"],
                                t.get("calls", 0) / t["requests"], t.get("max_depth")))
            if per:
                any_stats = True
                cells.append("%.2f / %.2f / %s" % (_med([p[0] for p in per]),
                                                   _med([p[1] for p in per]),
                                                   max(p[2] or 0 for p in per)))
            else:
                cells.append("–")
        if any_stats:
            stat_rows.append([server_label(meta, s)] + cells)
    if stat_rows:
        lines += ["## vblk plugin statistics (stats=)", "",
                  "Kicks per request / calls (interrupts) per request (medians) / max ring "
                  "depth seen, from the plugin's totals over the whole run (ramp included).", "",
                  _table(["server"] + [w.label for w in workloads], stat_rows), ""]

    failed = [r for r in runs if not r["ok"]]
    if failed:
        lines += ["## Failed runs", ""]
        lines += ["- round %d `%s` %s: %s" % (r["round"], r["server"], r["workload"],
                                              _gist(r.get("error")))
                  for r in failed]
        lines.append("")
    lines += ["## Servers", ""]
    for s in servers:
        spec = meta["server_specs"].get(s, {})
        lines.append("- %s: %s" % (server_label(meta, s), spec.get("description", "")))
        for role, argv in (meta["server_argv"].get(s) or {}).items():
            lines.append("  - %s: `%s`" % (role, " ".join(argv)))
    lines.append("")
    return "\n".join(lines)


def write_json(path, meta, summary, runs):
    with open(path, "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=1, sort_keys=False)
        f.write("\n")
