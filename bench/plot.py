#!/usr/bin/python3
"""Plots of one side-by-side dataplane benchmark run (bench/src/bin/sidebyside.rs).

    bench/plot.py RESULTS.json OUT_DIR
    bench/plot.py --markdown RESULTS.json     (the summary as Markdown tables, on stdout)

Reads the JSON the harness wrote and writes PNGs into OUT_DIR:
  dataplane-rates.png     new-flow and established forwarding rates (received at the sink)
                          per mode and number of services, with the offered rate
  dataplane-cpu.png       CPU ns per received frame (attributed: generator, node process,
                          irq + softirq), with the generator + sink floor
  dataplane-sync.png      full sync and one endpoint change (apply, end to end)
  dataplane-masq.png      masquerade past the SNAT port space: CPU per offered packet and
                          delivery per second, and the cost of a failed packet
Uses Debian's python3-matplotlib (the Agg backend: no display needed).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ["xdp_fwd", "kxp", "iptables", "nftables"]
COLORS = {"xdp_fwd": "#888888", "kxp": "#1f77b4", "iptables": "#d62728", "nftables": "#ff7f0e"}


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def samples(res, mode, metric, n, field, workers=1):
    return [
        s.get(field)
        for s in res.get("samples", [])
        if s.get("mode") == mode
        and s.get("metric") == metric
        # xdp_fwd does not look at services: the harness measures it at one size
        and (s.get("services") == n or mode == "xdp_fwd")
        and (s.get("workers", 1) == workers or mode == "xdp_fwd")
    ]


def title_suffix(res):
    m = res.get("machine", {})
    return "{} CPUs, {}, kernel {}, {}".format(
        m.get("nproc"), m.get("cpu_model", "")[:40], m.get("kernel"), m.get("date_utc")
    )


def bars(ax, res, metric, field, sizes, scale=1.0, ylabel="", log=False):
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        meds, lo, hi = [], [], []
        for n in sizes:
            xs = [x for x in samples(res, mode, metric, n, field) if x is not None]
            m = median(xs)
            meds.append((m or 0) * scale)
            lo.append(((m or 0) - min(xs)) * scale if xs else 0)
            hi.append((max(xs) - (m or 0)) * scale if xs else 0)
        if not any(meds):
            continue
        xs = [j + (i - (len(MODES) - 1) / 2) * width for j in range(len(sizes))]
        ax.bar(xs, meds, width, yerr=[lo, hi], label=mode, color=COLORS[mode], capsize=2)
        for x, m in zip(xs, meds):
            if m:
                ax.annotate(
                    f"{m:.3g}", (x, m), ha="center", va="bottom", fontsize=7, rotation=90,
                    xytext=(0, 2), textcoords="offset points",
                )
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([f"{n:,} services" for n in sizes])
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def fmt(v, unit=""):
    if v is None:
        return "-"
    if unit == "ms":
        return f"{v * 1e3:.3g} ms" if v * 1e3 < 100 else f"{v * 1e3:,.0f} ms"
    if unit == "x":
        return f"{v:.2f}x" if v < 10 else f"{v:.0f}x"
    return f"{v:,.0f}"


def markdown(res):
    rows = res.get("summary", [])
    print("| metric | services | workers | xdp_fwd | kxp | iptables | nftables "
          "| kxp/iptables | kxp/nftables | kxp/xdp_fwd |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if r.get("unit") == "s":
            continue
        print(f"| {r['label']} | {r['services']:,} | {r['workers']} | {fmt(r.get('xdp_fwd'))} "
              f"| {fmt(r.get('kxp'))} | {fmt(r.get('iptables'))} | {fmt(r.get('nftables'))} "
              f"| {fmt(r.get('kxp_over_iptables'), 'x')} | {fmt(r.get('kxp_over_nftables'), 'x')} "
              f"| {fmt(r.get('kxp_over_xdp_fwd'), 'x')} |")
    print()
    print("| sync | services | kxp | iptables | nftables | iptables/kxp | nftables/kxp |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if r.get("unit") != "s":
            continue
        print(f"| {r['label']} | {r['services']:,} | {fmt(r.get('kxp'), 'ms')} "
              f"| {fmt(r.get('iptables'), 'ms')} | {fmt(r.get('nftables'), 'ms')} "
              f"| {fmt(r.get('iptables_over_kxp'), 'x')} | {fmt(r.get('nftables_over_kxp'), 'x')} |")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--markdown":
        markdown(json.load(open(sys.argv[2])))
        return
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    res = json.load(open(sys.argv[1]))
    out = sys.argv[2].rstrip("/")
    sizes = sorted({s["services"] for s in res.get("samples", [])})
    written = []

    if sizes:
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        bars(axes[0], res, "new_udp", "received_pps", sizes, 1e-3, "k frames/s received", log=True)
        axes[0].set_title("new flows (every packet a new 5-tuple), UDP 64 B")
        bars(axes[1], res, "est_udp", "received_pps", sizes, 1e-3, "k frames/s received")
        axes[1].set_title("established flows, UDP 64 B")
        fig.suptitle("Forwarding rate at the sink, offered at max rate (median, min-max)\n"
                     + title_suffix(res), fontsize=9)
        fig.tight_layout()
        fig.savefig(f"{out}/dataplane-rates.png", dpi=110)
        written.append(f"{out}/dataplane-rates.png")
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        floor = (res.get("floor") or {}).get("cpu_attributed_ns_per_rx_frame")
        for ax, metric, title in [
            (axes[0], "new_udp", "new flows, UDP"),
            (axes[1], "est_udp", "established, UDP"),
        ]:
            bars(ax, res, metric, "cpu_attributed_ns_per_rx_frame", sizes, 1.0,
                 "CPU ns per received frame (attributed)")
            if floor:
                ax.axhline(floor, color="black", ls="--", lw=1,
                           label=f"generator + sink alone ({floor:.0f} ns)")
                ax.legend(fontsize=8)
            ax.set_title(title)
        fig.suptitle("CPU time per forwarded frame: generator + node process + all irq/softirq "
                     "(the whole-system figure is in the JSON and the table)\n"
                     + title_suffix(res), fontsize=9)
        fig.tight_layout()
        fig.savefig(f"{out}/dataplane-cpu.png", dpi=110)
        written.append(f"{out}/dataplane-cpu.png")
        plt.close(fig)

    sync_rows = [r for r in res.get("summary", []) if r.get("unit") == "s"]
    if sync_rows:
        kinds = [("full_sync", "full sync"), ("change_apply", "one endpoint change: apply"),
                 ("change_e2e", "one endpoint change: end to end")]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for ax, (key, title) in zip(axes, kinds):
            rows = [r for r in sync_rows if r["metric"] == key]
            ns = sorted({r["services"] for r in rows})
            width = 0.25
            for i, mode in enumerate(["kxp", "iptables", "nftables"]):
                vals = []
                for n in ns:
                    v = next((r.get(mode) for r in rows if r["services"] == n), None)
                    vals.append((v or 0) * 1e3)
                xs = [j + (i - 1) * width for j in range(len(ns))]
                ax.bar(xs, vals, width, label=mode, color=COLORS[mode])
                for x, v in zip(xs, vals):
                    if v:
                        ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(ns)))
            ax.set_xticklabels([f"{n:,}" for n in ns])
            ax.set_xlabel("services")
            ax.set_ylabel("ms")
            ax.set_yscale("log")
            ax.set_title(title)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Rule / table sync\n" + title_suffix(res), fontsize=9)
        fig.tight_layout()
        fig.savefig(f"{out}/dataplane-sync.png", dpi=110)
        written.append(f"{out}/dataplane-sync.png")
        plt.close(fig)

    masq = res.get("masquerade") or []
    if masq:
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
        rate = res.get("options", {}).get("masq_rate") or 1
        space = masq[0].get("snat_space_flows") or 193536
        for m in masq:
            rows = m.get("per_second") or []
            xs = [r["offered_cumulative"] / 1e3 for r in rows]
            c = COLORS.get(m["mode"])
            axes[0].plot(xs, [r["cpu_attributed_ns_per_offered"] / 1e3 for r in rows],
                         marker="o", label=m["mode"], color=c)
            axes[1].plot(xs, [100.0 * r["received"] / r["offered"] if r["offered"] else 0
                              for r in rows], marker="o", label=m["mode"], color=c)
        for ax in axes[:2]:
            ax.axvline(space / 1e3, color="black", ls="--", lw=1, label=f"{space:,.0f} flows")
            ax.set_xlabel("k new flows offered (cumulative, end of each second)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_ylabel("CPU us per offered packet (attributed)")
        axes[0].set_yscale("log")
        axes[0].set_title(f"phase 1: new flows at {rate:,} pps, 3 backends, masquerade")
        axes[1].set_ylabel("% of offered delivered to the backends")
        axes[1].set_title("delivered, per second")
        names, vals = [], []
        for m in masq:
            e = m.get("exhausted_max_rate") or {}
            v = e.get("cpu_attributed_ns_per_tx_frame")
            if v:
                names.append(m["mode"])
                vals.append(v / 1e3)
        axes[2].bar(names, vals, color=[COLORS.get(n) for n in names])
        for i, v in enumerate(vals):
            axes[2].annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
        floor = (res.get("floor") or {}).get("cpu_attributed_ns_per_rx_frame")
        if floor:
            axes[2].axhline(floor / 1e3, color="black", ls="--", lw=1,
                            label=f"generator + sink alone ({floor / 1e3:.2g} us)")
            axes[2].legend(fontsize=8)
        axes[2].set_yscale("log")
        axes[2].set_ylabel("CPU us per offered packet (attributed)")
        axes[2].set_title("phase 2: space used up, max rate (every packet fails)")
        axes[2].grid(axis="y", alpha=0.3)
        fig.suptitle("SNAT port exhaustion\n" + title_suffix(res), fontsize=9)
        fig.tight_layout()
        fig.savefig(f"{out}/dataplane-masq.png", dpi=110)
        written.append(f"{out}/dataplane-masq.png")
        plt.close(fig)

    for w in written:
        print(f"wrote {w}")


if __name__ == "__main__":
    main()
