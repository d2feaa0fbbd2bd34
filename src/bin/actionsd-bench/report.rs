//! Figures, their targets, and the summary table.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies in microseconds, 1 µs to 5 min, 3 significant digits.
pub struct Latency(Histogram<u64>);

impl Latency {
    pub fn new() -> Self {
        // The bounds are constants within hdrhistogram's limits.
        Self(Histogram::new_with_bounds(1, 300_000_000, 3).expect("valid histogram bounds"))
    }

    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(micros.max(1));
    }

    pub fn add(&mut self, other: &Latency) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    /// "p50 1.20 / p99 3.40 / p99.9 5.60 ms".
    pub fn summary(&self) -> String {
        if self.count() == 0 {
            return "no samples".to_owned();
        }
        format!(
            "p50 {:.2} / p99 {:.2} / p99.9 {:.2} ms",
            self.quantile_ms(0.5),
            self.quantile_ms(0.99),
            self.quantile_ms(0.999)
        )
    }
}

/// One line of the summary.
pub struct Row {
    pub scenario: String,
    pub figure: String,
    pub value: String,
    pub target: String,
    pub note: String,
}

pub struct Report {
    rows: Vec<Row>,
    failures: Vec<String>,
    /// `--smoke`: a second per scenario to check that each one runs. Its
    /// figures are not measurements, so no target is shown next to them.
    smoke: bool,
}

/// Printed first and last in a smoke run.
const SMOKE_NOTICE: &str = "SMOKE TEST: about a second per scenario, to check that each runs; \
the figures are not measurements and no target applies (BENCHMARKS.md has measured figures)";

impl Report {
    pub fn new(smoke: bool) -> Self {
        if smoke {
            println!("{SMOKE_NOTICE}");
        }
        Self {
            rows: Vec::new(),
            failures: Vec::new(),
            smoke,
        }
    }

    /// Records a figure and prints it at once.
    pub fn figure(
        &mut self,
        scenario: &str,
        figure: &str,
        value: String,
        target: &str,
        note: String,
    ) {
        let target = if self.smoke {
            "none (smoke test)"
        } else {
            target
        };
        println!("  {scenario:<22} {figure:<30} {value:<40} target {target}   {note}");
        self.rows.push(Row {
            scenario: scenario.to_owned(),
            figure: figure.to_owned(),
            value,
            target: target.to_owned(),
            note,
        });
    }

    /// A line of context (CPU split, batch sizes) under the last figure.
    pub fn context(&mut self, text: String) {
        println!("      {text}");
        if let Some(last) = self.rows.last_mut() {
            if !last.note.is_empty() {
                last.note.push_str("; ");
            }
            last.note.push_str(&text);
        }
    }

    pub fn fail(&mut self, failure: String) {
        eprintln!("FAILED: {failure}");
        self.failures.push(failure);
    }

    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The figures as a Markdown table (what BENCHMARKS.md shows).
    pub fn print_summary(&self) {
        if self.smoke {
            println!("\n{SMOKE_NOTICE}");
        }
        println!("\n| Scenario | Figure | actionsd | Target | Notes |");
        println!("| --- | --- | --- | --- | --- |");
        for row in &self.rows {
            println!(
                "| {} | {} | {} | {} | {} |",
                row.scenario, row.figure, row.value, row.target, row.note
            );
        }
        if self.failures.is_empty() {
            println!("\nall scenarios completed");
        } else {
            println!("\n{} failure(s):", self.failures.len());
            for failure in &self.failures {
                println!("- {failure}");
            }
        }
    }
}

/// Prints what the figures were measured on.
pub fn print_machine() {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or_else(
            || "?".to_owned(),
            |kib| format!("{:.0} GiB", kib as f64 / 1048576.0),
        );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    // The daemon it starts is the actionsd next to this binary, normally
    // of the same build.
    let build = if cfg!(debug_assertions) {
        "debug build (unoptimised)"
    } else {
        "release build"
    };
    println!(
        "machine: {cores} cores, {memory}; {build}; load average {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}

/// "12,345".
pub fn thousands(value: f64) -> String {
    let rounded = value.round() as i64;
    let digits = rounded.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// "1.23×" or "n/a".
pub fn ratio(value: f64, base: Option<f64>) -> String {
    match base {
        Some(base) if base > 0.0 => format!("{:.2}×", value / base),
        _ => "n/a".to_owned(),
    }
}

/// The daemon's peak memory, for the notes.
pub fn peak(kib: Option<u64>) -> String {
    kib.map_or_else(
        || "peak RSS n/a".to_owned(),
        |k| format!("daemon peak RSS {:.0} MiB", k as f64 / 1024.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoke_figures_carry_no_target() {
        let mut smoke = Report::new(true);
        smoke.figure(
            "enqueue",
            "throughput",
            "12 /s".into(),
            "≥ 3× pgbench",
            String::new(),
        );
        assert_eq!(smoke.rows[0].target, "none (smoke test)");
        assert!(SMOKE_NOTICE.contains("not measurements"));
        let mut full = Report::new(false);
        full.figure(
            "enqueue",
            "throughput",
            "12 /s".into(),
            "≥ 3× pgbench",
            String::new(),
        );
        assert_eq!(full.rows[0].target, "≥ 3× pgbench");
    }
}
