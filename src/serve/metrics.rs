//! Counters the server keeps, rendered in Prometheus' text format for `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Upper bounds of the batch-size histogram buckets.
const BATCH_BUCKETS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

/// Everything `/metrics` reports. Shared between the HTTP handlers and the engine thread.
#[derive(Debug, Default)]
pub struct Metrics {
    /// HTTP responses by (route, status code).
    responses: Mutex<BTreeMap<(String, u16), u64>>,
    /// Generation requests accepted into the queue, by endpoint.
    accepted: Mutex<BTreeMap<&'static str, u64>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// Batches run, and how many of each size.
    batch_sizes: Mutex<BTreeMap<usize, u64>>,
    /// Rows stopped because their client went away (queued or running).
    cancelled: AtomicU64,
    /// Rows waiting in the queue now.
    pub queued: AtomicUsize,
    /// Rows in the batch running now.
    pub running: AtomicUsize,
}

impl Metrics {
    /// Counts one HTTP response.
    pub fn response(&self, route: &str, status: u16) {
        *lock(&self.responses)
            .entry((route.to_string(), status))
            .or_default() += 1;
    }

    /// Counts a generation request accepted for `endpoint` with `prompt_tokens` in total.
    pub fn accepted(&self, endpoint: &'static str, prompt_tokens: usize) {
        *lock(&self.accepted).entry(endpoint).or_default() += 1;
        self.prompt_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    }

    /// Counts one generated token.
    pub fn token(&self) {
        self.completion_tokens.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a batch of `size` rows starting.
    pub fn batch(&self, size: usize) {
        *lock(&self.batch_sizes).entry(size).or_default() += 1;
    }

    /// Counts rows dropped because their client disconnected.
    pub fn cancelled(&self, rows: usize) {
        self.cancelled.fetch_add(rows as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let o = &mut out;
        let n = header(
            o,
            "flexgen_http_responses_total",
            "counter",
            "HTTP responses by route and status code.",
        );
        for ((route, status), c) in lock(&self.responses).iter() {
            let _ = writeln!(o, "{n}{{route=\"{route}\",status=\"{status}\"}} {c}");
        }
        let n = header(
            o,
            "flexgen_requests_total",
            "counter",
            "Generation requests accepted into the queue, by endpoint.",
        );
        for (endpoint, c) in lock(&self.accepted).iter() {
            let _ = writeln!(o, "{n}{{endpoint=\"{endpoint}\"}} {c}");
        }
        let singles = [
            (
                "flexgen_prompt_tokens_total",
                "counter",
                "Prompt tokens of accepted requests (BOS included).",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "flexgen_completion_tokens_total",
                "counter",
                "Tokens generated.",
                self.completion_tokens.load(Ordering::Relaxed),
            ),
            (
                "flexgen_cancelled_rows_total",
                "counter",
                "Rows stopped (or never started) because their client disconnected.",
                self.cancelled.load(Ordering::Relaxed),
            ),
            (
                "flexgen_queue_length",
                "gauge",
                "Rows waiting for the next batch.",
                self.queued.load(Ordering::Relaxed) as u64,
            ),
            (
                "flexgen_running_rows",
                "gauge",
                "Rows in the batch running now.",
                self.running.load(Ordering::Relaxed) as u64,
            ),
        ];
        for (name, kind, help, v) in singles {
            header(o, name, kind, help);
            let _ = writeln!(o, "{name} {v}");
        }
        let sizes = lock(&self.batch_sizes).clone();
        let n = header(
            o,
            "flexgen_batches_by_size_total",
            "counter",
            "Batches run, by number of rows.",
        );
        for (size, c) in &sizes {
            let _ = writeln!(o, "{n}{{size=\"{size}\"}} {c}");
        }
        let n = header(
            o,
            "flexgen_batch_size_max",
            "gauge",
            "Largest batch run so far.",
        );
        let _ = writeln!(o, "{n} {}", sizes.keys().max().copied().unwrap_or(0));
        let n = header(o, "flexgen_batch_size", "histogram", "Rows per batch run.");
        for le in BATCH_BUCKETS {
            let c: u64 = sizes.range(..=le).map(|(_, c)| c).sum();
            let _ = writeln!(o, "{n}_bucket{{le=\"{le}\"}} {c}");
        }
        let count: u64 = sizes.values().sum();
        let sum: u64 = sizes.iter().map(|(s, c)| *s as u64 * c).sum();
        let _ = writeln!(o, "{n}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(o, "{n}_sum {sum}");
        let _ = writeln!(o, "{n}_count {count}");
        out
    }
}

/// Writes a metric family's HELP and TYPE lines; returns its name.
fn header<'a>(out: &mut String, name: &'a str, kind: &str, help: &str) -> &'a str {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    name
}

/// Locks a counter map; a panic elsewhere while holding it leaves counts that are still valid.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_histogram() {
        let m = Metrics::default();
        m.response("/v1/completions", 200);
        m.response("/v1/completions", 200);
        m.response("/v1/completions", 400);
        m.accepted("completions", 7);
        m.batch(1);
        m.batch(31);
        m.token();
        let text = m.render();
        for line in [
            "flexgen_http_responses_total{route=\"/v1/completions\",status=\"200\"} 2",
            "flexgen_http_responses_total{route=\"/v1/completions\",status=\"400\"} 1",
            "flexgen_requests_total{endpoint=\"completions\"} 1",
            "flexgen_prompt_tokens_total 7",
            "flexgen_completion_tokens_total 1",
            "flexgen_batches_by_size_total{size=\"31\"} 1",
            "flexgen_batch_size_max 31",
            "flexgen_batch_size_bucket{le=\"16\"} 1",
            "flexgen_batch_size_bucket{le=\"32\"} 2",
            "flexgen_batch_size_sum 32",
            "flexgen_batch_size_count 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
    }
}
