//! The Prometheus text encoder: the only code that writes the exposition
//! format. The libraries keep plain atomic counters and hand out plain
//! snapshots of them (`portless_dns::metrics::Snapshot`,
//! `portless_router::metrics::Snapshot`, the netplane agent's `Status`);
//! `crate::admin::metrics` names them and encodes them here. One histogram
//! type ([`Histogram`]: seconds, the bounds of [`LATENCY_BOUNDS`]) serves
//! every histogram, and every label value is escaped.
//!
//! Our own rather than `prometheus-client`: that crate's metric types would
//! replace the libraries' atomics (its histogram takes a lock per
//! observation) or need a collector shim per snapshot, while what is needed
//! is a text format with one escaping rule: this file, under 300 lines.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of every portless histogram. The libraries record
/// into these same bounds (a test below checks that they agree).
pub const LATENCY_BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A histogram as encoded: counts per bucket (not cumulative; observations
/// over the last bound are `count` minus their sum), the count and the sum
/// in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    /// From counts that are already cumulative (the netplane's lag).
    pub fn from_cumulative(bounds: &[f64], cumulative: &[u64], count: u64, sum: Duration) -> Self {
        let mut prev = 0;
        let buckets = cumulative
            .iter()
            .map(|&c| {
                let n = c.saturating_sub(prev);
                prev = c;
                n
            })
            .collect();
        Histogram {
            bounds: bounds.to_vec(),
            buckets,
            count,
            sum_seconds: sum.as_secs_f64(),
        }
    }
}

/// The binary's own recorder (the DNS event-to-answer time), lock-free.
#[derive(Debug, Default)]
pub struct Recorder {
    buckets: [AtomicU64; LATENCY_BOUNDS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Recorder {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BOUNDS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub fn snapshot(&self) -> Histogram {
        Histogram {
            bounds: LATENCY_BOUNDS.to_vec(),
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            count: self.count.load(Ordering::Relaxed),
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// The kind of a metric family (`# TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A sample's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(i64),
    Uint(u64),
    Float(f64),
}

macro_rules! value_from {
    ($($t:ty => $v:ident as $as:ty),*) => {$(
        impl From<$t> for Value {
            fn from(x: $t) -> Self {
                Value::$v(x as $as)
            }
        }
    )*};
}
value_from!(u64 => Uint as u64, u32 => Uint as u64, u8 => Uint as u64, usize => Uint as u64,
    i64 => Int as i64, f64 => Float as f64);

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Uint(u64::from(b))
    }
}

fn write_f64(out: &mut String, x: f64) {
    // Rust writes `inf`/`NaN`; the format wants `+Inf`, `-Inf`, `NaN`.
    if x == f64::INFINITY {
        out.push_str("+Inf");
    } else if x == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        let _ = write!(out, "{x}");
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Uint(v) => write!(f, "{v}"),
            Value::Float(v) => {
                let mut s = String::new();
                write_f64(&mut s, v);
                f.write_str(&s)
            }
        }
    }
}

/// Labels of one sample: name (a fixed identifier) and value (escaped).
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// A `/metrics` page being written.
#[derive(Debug, Default)]
pub struct Text {
    out: String,
    families: std::collections::BTreeSet<String>,
}

impl Text {
    /// Start a family: writes its `# HELP` and `# TYPE` lines once. A
    /// family opened twice is a bug of the caller (promtool refuses it).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> Family<'_> {
        debug_assert!(
            !self.families.contains(name),
            "metric family {name} written twice"
        );
        self.families.insert(name.to_owned());
        self.out.push_str("# HELP ");
        self.out.push_str(name);
        self.out.push(' ');
        escape(&mut self.out, help, false);
        let _ = writeln!(self.out, "\n# TYPE {name} {}", kind.as_str());
        Family {
            out: &mut self.out,
            name: name.to_owned(),
        }
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, v: impl Into<Value>) {
        self.family(name, kind, help).sample(&[], v);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// The samples of one family.
pub struct Family<'a> {
    out: &'a mut String,
    name: String,
}

impl Family<'_> {
    pub fn sample(&mut self, labels: Labels<'_>, v: impl Into<Value>) -> &mut Self {
        sample_line(self.out, &self.name, "", labels, None, v.into());
        self
    }

    /// A histogram's `_bucket` (cumulative, with `le="+Inf"`), `_sum` and
    /// `_count` samples.
    pub fn histogram(&mut self, labels: Labels<'_>, h: &Histogram) -> &mut Self {
        let mut cumulative = 0u64;
        let mut le = String::new();
        for (bound, n) in h.bounds.iter().zip(&h.buckets) {
            cumulative += n;
            le.clear();
            write_f64(&mut le, *bound);
            sample_line(
                self.out,
                &self.name,
                "_bucket",
                labels,
                Some(&le),
                Value::Uint(cumulative),
            );
        }
        sample_line(
            self.out,
            &self.name,
            "_bucket",
            labels,
            Some("+Inf"),
            Value::Uint(h.count),
        );
        sample_line(
            self.out,
            &self.name,
            "_sum",
            labels,
            None,
            Value::Float(h.sum_seconds),
        );
        sample_line(
            self.out,
            &self.name,
            "_count",
            labels,
            None,
            Value::Uint(h.count),
        );
        self
    }
}

fn sample_line(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: Labels<'_>,
    le: Option<&str>,
    v: Value,
) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || le.is_some() {
        out.push('{');
        let mut first = true;
        for (k, val) in labels.iter().copied().chain(le.map(|l| ("le", l))) {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(k);
            out.push_str("=\"");
            escape(out, val, true);
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {v}");
}

/// Escape a label value (`\`, `"`, newline) or a HELP text (`\`, newline).
fn escape(out: &mut String, s: &str, quote: bool) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_escape_backslash_quote_and_newline() {
        let mut t = Text::default();
        t.family("x_total", Kind::Counter, "help")
            .sample(&[("route", "a\\b\"c\nd")], 1u64);
        let out = t.finish();
        assert!(
            out.contains("x_total{route=\"a\\\\b\\\"c\\nd\"} 1\n"),
            "{out}"
        );
    }

    #[test]
    fn help_escapes_backslash_and_newline_only() {
        let mut t = Text::default();
        t.single("x", Kind::Gauge, "a \"b\" \\ c\nd", 0u64);
        let out = t.finish();
        assert!(
            out.starts_with("# HELP x a \"b\" \\\\ c\\nd\n# TYPE x gauge\nx 0\n"),
            "{out}"
        );
    }

    #[test]
    fn help_and_type_once_per_family_whatever_the_samples() {
        let mut t = Text::default();
        let mut f = t.family("req_total", Kind::Counter, "Requests.");
        for route in ["a", "b", "c"] {
            f.sample(&[("route", route)], 1u64);
        }
        t.family("lat_seconds", Kind::Histogram, "Latency.")
            .histogram(&[("route", "a")], &Recorder::default().snapshot())
            .histogram(&[("route", "b")], &Recorder::default().snapshot());
        let out = t.finish();
        for name in ["req_total", "lat_seconds"] {
            assert_eq!(out.matches(&format!("# HELP {name} ")).count(), 1, "{out}");
            assert_eq!(out.matches(&format!("# TYPE {name} ")).count(), 1, "{out}");
        }
        assert_eq!(out.matches("lat_seconds_count{").count(), 2, "{out}");
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_inf_sum_and_count() {
        let h = Recorder::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(10));
        let mut t = Text::default();
        t.family("x_seconds", Kind::Histogram, "help")
            .histogram(&[("route", "r\"")], &h.snapshot());
        let out = t.finish();
        for line in [
            "x_seconds_bucket{route=\"r\\\"\",le=\"0.0005\"} 1",
            "x_seconds_bucket{route=\"r\\\"\",le=\"0.001\"} 1",
            "x_seconds_bucket{route=\"r\\\"\",le=\"0.005\"} 2",
            "x_seconds_bucket{route=\"r\\\"\",le=\"1\"} 2",
            "x_seconds_bucket{route=\"r\\\"\",le=\"5\"} 2",
            "x_seconds_bucket{route=\"r\\\"\",le=\"+Inf\"} 3",
            "x_seconds_sum{route=\"r\\\"\"} 10.0033",
            "x_seconds_count{route=\"r\\\"\"} 3",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line}:\n{out}");
        }
        let buckets = out.lines().filter(|l| l.contains("_bucket")).count();
        assert_eq!(buckets, LATENCY_BOUNDS.len() + 1, "{out}");
    }

    #[test]
    fn histogram_without_labels_has_only_le_and_bare_sum() {
        let mut t = Text::default();
        t.family("y_seconds", Kind::Histogram, "help")
            .histogram(&[], &Recorder::default().snapshot());
        let out = t.finish();
        assert!(out.contains("y_seconds_bucket{le=\"+Inf\"} 0\n"), "{out}");
        assert!(
            out.contains("\ny_seconds_sum 0\ny_seconds_count 0\n"),
            "{out}"
        );
    }

    #[test]
    fn cumulative_counts_are_taken_apart() {
        let h = Histogram::from_cumulative(&[0.1, 1.0], &[2, 5], 6, Duration::from_secs(3));
        assert_eq!(h.buckets, vec![2, 3]);
        let mut t = Text::default();
        t.family("z", Kind::Histogram, "h").histogram(&[], &h);
        let out = t.finish();
        assert!(out.contains("z_bucket{le=\"0.1\"} 2\nz_bucket{le=\"1\"} 5\nz_bucket{le=\"+Inf\"} 6\nz_sum 3\nz_count 6\n"), "{out}");
    }

    #[test]
    fn floats_are_written_as_the_format_wants() {
        assert_eq!(Value::from(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Value::from(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(Value::from(f64::NAN).to_string(), "NaN");
        assert_eq!(Value::from(0.25).to_string(), "0.25");
        assert_eq!(Value::from(-3i64).to_string(), "-3");
    }

    #[test]
    fn every_library_records_into_the_same_bounds() {
        assert_eq!(portless_router::metrics::LATENCY_BUCKETS, LATENCY_BOUNDS);
        assert_eq!(portless_netplane::agent::LAG_BUCKETS, LATENCY_BOUNDS);
    }
}
