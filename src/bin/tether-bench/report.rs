//! The table, the targets beside it, and the JSON file.

use crate::stats::Figure;
use serde::Serialize;
use serde_json::Value;

/// One target of issue 5 and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    /// `None` when the run did not measure it.
    pub met: Option<bool>,
}

fn find<'a>(figs: &'a [Figure], name: &str) -> Option<&'a Figure> {
    figs.iter().find(|f| f.name == name)
}

fn fmt_num(x: Option<f64>) -> String {
    match x {
        None => "-".into(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

pub fn table(figs: &[Figure]) -> String {
    let w = figs.iter().map(|f| f.name.len()).max().unwrap_or(6).max(6);
    let mut s = format!(
        "{:<w$}  {:>11}  {:>10}  {:>10}  {:>7}\n",
        "figure", "unit", "tether", "direct", "ratio"
    );
    s.push_str(&format!("{}\n", "-".repeat(w + 46)));
    for f in figs {
        s.push_str(&format!(
            "{:<w$}  {:>11}  {:>10}  {:>10}  {:>7}\n",
            f.name,
            f.unit,
            fmt_num(f.tether),
            fmt_num(f.direct),
            f.ratio.map(|r| format!("{r:.2}x")).unwrap_or("-".into()),
        ));
    }
    s
}

/// The largest server scale step measured (10000, else 1000, ...).
fn scale_step(figs: &[Figure]) -> Option<String> {
    figs.iter()
        .filter_map(|f| f.name.strip_prefix("server_rss_kb_per_agent_"))
        .max_by_key(|n| n.parse::<u64>().unwrap_or(0))
        .map(str::to_string)
}

pub fn targets(figs: &[Figure]) -> Vec<Target> {
    let mut t = Vec::new();
    let mut push = |target: &str, measured: Option<(String, bool)>| {
        t.push(Target {
            target: target.into(),
            measured: measured
                .as_ref()
                .map(|m| m.0.clone())
                .unwrap_or("not measured".into()),
            met: measured.map(|m| m.1),
        });
    };
    let both = |name: &str| {
        let f = find(figs, name)?;
        Some((f.tether?, f.direct?, f.ratio?))
    };
    push(
        "exec added latency <= 1 ms at p50",
        find(figs, "exec_rtt_added_p50_ms")
            .and_then(|f| f.tether)
            .map(|added| {
                let medians = both("exec_rtt_p50_ms")
                    .map(|(t, d, _)| format!("; medians {t:.2} vs {d:.2} ms"))
                    .unwrap_or_default();
                (
                    format!("{added:+.2} ms (median of paired differences{medians})"),
                    added <= 1.0,
                )
            }),
    );
    for (name, what) in [
        ("exec_throughput_mb_s", "exec output throughput"),
        ("file_put_mb_s", "file put"),
        ("file_get_mb_s", "file get"),
    ] {
        push(
            &format!("{what} >= 90% of direct"),
            both(name).map(|(_, _, r)| (format!("{:.0}%", r * 100.0), r >= 0.9)),
        );
    }
    push(
        "spawn <= 1.05x direct",
        both("spawn_ms").map(|(_, _, r)| (format!("{r:.2}x"), r <= 1.05)),
    );
    // A burst beside a stalled reader against the same burst alone.
    let stall = |stalled: &str, plain: &str| {
        let (s, u) = (find(figs, stalled)?.tether?, find(figs, plain)?.tether?);
        Some((format!("{:.2}x ({s:.2} vs {u:.2} s)", s / u), s / u <= 1.1))
    };
    push(
        "a stalled channel costs the others nothing (stalled <= 1.1x unstalled)",
        stall("concurrent_1000_exec_stalled_s", "concurrent_1000_exec_s"),
    );
    push(
        "tunnel throughput >= 80% of direct TCP",
        both("tunnel_throughput_mb_s").map(|(_, _, r)| (format!("{:.0}%", r * 100.0), r >= 0.8)),
    );
    push(
        "200 tunnel connections beside a stalled one (stalled <= 1.1x unstalled)",
        stall("tunnel_200_conn_stalled_s", "tunnel_200_conn_s"),
    );
    for (name, what, limit) in [
        (
            "tunnel_connect_added_ms",
            "tunnel connect + first byte",
            2.0,
        ),
        ("preview_http_rtt_added_ms", "preview HTTP round trip", 2.0),
        ("inference_rtt_added_ms", "inference proxy round trip", 1.0),
        (
            "inference_first_chunk_added_ms",
            "inference proxy first streamed chunk",
            1.0,
        ),
    ] {
        push(
            &format!("{what} adds <= {limit} ms at p50"),
            find(figs, name).and_then(|f| f.tether).map(|v| {
                (
                    format!("{v:+.2} ms (median of paired differences)"),
                    v <= limit,
                )
            }),
        );
    }
    push(
        "a request through a replica that does not hold the node adds <= 2 ms at p99",
        find(figs, "server_forward_dispatch_added_p99_ms")
            .and_then(|f| f.tether)
            .map(|v| {
                (
                    format!("{v:+.2} ms (p99 through the other minus p99 through the holder)"),
                    v <= 2.0,
                )
            }),
    );
    let peak = find(figs, "inference_proxy_peak_rss_mb").and_then(|f| f.tether);
    push(
        "inference proxy memory <= 5 MB per job (its own, not the shared binary)",
        find(figs, "inference_proxy_anon_mb")
            .and_then(|f| f.tether)
            .map(|v| {
                let peak = peak
                    .map(|p| format!("; RSS peak {p:.1} MB"))
                    .unwrap_or_default();
                (format!("{v:.1} MB anonymous{peak}"), v <= 5.0)
            }),
    );
    push(
        "agent idle RSS <= 10 MB",
        find(figs, "agent_idle_rss_mb")
            .and_then(|f| f.tether)
            .map(|v| (format!("{v:.1} MB"), v <= 10.0)),
    );
    let step = scale_step(figs);
    let at = step.clone().unwrap_or("10000".into());
    let note = if at == "10000" {
        String::new()
    } else {
        format!(" (measured at {at} agents)")
    };
    push(
        "server <= 30 KB per idle agent connection at 10,000",
        find(figs, &format!("server_rss_kb_per_agent_{at}"))
            .and_then(|f| f.tether)
            .map(|v| (format!("{v:.1} KB{note}"), v <= 30.0)),
    );
    push(
        "dispatch p99 <= 5 ms (at 10,000 agents)",
        find(figs, &format!("server_dispatch_p99_ms_{at}"))
            .and_then(|f| f.tether)
            .map(|v| (format!("{v:.2} ms{note}"), v <= 5.0)),
    );
    t
}

pub fn targets_text(targets: &[Target]) -> String {
    let mut s = String::from("Targets:\n");
    for t in targets {
        let mark = match t.met {
            Some(true) => "met   ",
            Some(false) => "MISSED",
            None => "n/a   ",
        };
        s.push_str(&format!("  [{mark}] {}: {}\n", t.target, t.measured));
    }
    s
}

/// The JSON file: `{"machine", "figures", "targets", "run"}`.
pub fn json(machine: Value, figs: &[Figure], targets: &[Target], run: Value) -> Value {
    serde_json::json!({
        "machine": machine,
        "figures": figs,
        "targets": targets,
        "run": run,
    })
}
