//! The closed-loop load driver: N slots, each keeping one call in flight, for a warm-up and
//! then a measured window; latencies of the calls that start inside the window are recorded.
//!
//! Closed loop (each slot sends its next call when the previous one answers) is what
//! "N concurrent in-flight calls" means; it measures throughput at that concurrency and the
//! latency a caller at that concurrency sees.

use std::future::Future;
use std::time::{Duration, Instant};

use super::procfs;
use super::stats::Latency;

/// One slot's calls. `call` returns how many items the call carried (1 for unary calls) or
/// an error text.
pub trait Driver: Send + 'static {
    /// Sends one call and waits for its answer.
    fn call(&mut self) -> impl Future<Output = Result<u64, String>> + Send;
}

/// What one measured window saw.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// Calls that started in the window and succeeded.
    pub requests: u64,
    /// Items those calls carried.
    pub items: u64,
    /// Calls that started in the window and failed.
    pub errors: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Window length in seconds.
    pub seconds: f64,
    /// Latency of the successful calls.
    pub latency: Latency,
    /// Server CPU seconds spent during the window, if its pid is known.
    pub server_cpu_seconds: Option<f64>,
    /// This process's CPU seconds during the window (the load generator's own cost).
    pub client_cpu_seconds: Option<f64>,
    /// CPU seconds of the server's audit writer thread (`audit-writer`) during the window:
    /// against the window, how much of one core the one writer used (issue 19).
    pub writer_cpu_seconds: Option<f64>,
}

impl Window {
    /// Successful calls per second.
    pub fn rps(&self) -> f64 {
        super::stats::ratio(self.requests as f64, self.seconds)
    }

    /// Items per second.
    pub fn items_per_second(&self) -> f64 {
        super::stats::ratio(self.items as f64, self.seconds)
    }

    /// Cores the server used on average during the window.
    pub fn server_cores(&self) -> Option<f64> {
        self.server_cpu_seconds
            .map(|s| super::stats::ratio(s, self.seconds))
    }

    /// Share of one core the server's audit writer thread used during the window.
    pub fn writer_cores(&self) -> Option<f64> {
        self.writer_cpu_seconds
            .map(|s| super::stats::ratio(s, self.seconds))
    }

    /// Server CPU microseconds per successful call.
    pub fn server_cpu_us_per_request(&self) -> Option<f64> {
        self.server_cpu_seconds
            .map(|s| super::stats::ratio(s * 1e6, self.requests as f64))
    }
}

struct SlotResult {
    requests: u64,
    items: u64,
    errors: u64,
    first_error: Option<String>,
    latencies: Vec<u64>,
}

/// Runs `concurrency` slots made by `make(slot)` for `warmup` + `window`, and reports the
/// window. `server_pid` names the process whose CPU time to read before and after.
pub async fn run<D: Driver>(
    concurrency: usize,
    warmup: Duration,
    window: Duration,
    server_pid: Option<u32>,
    make: impl Fn(usize) -> D,
) -> Window {
    let start = Instant::now() + warmup;
    let end = start + window;
    let mut tasks = Vec::with_capacity(concurrency);
    for slot in 0..concurrency.max(1) {
        let mut driver = make(slot);
        tasks.push(tokio::spawn(async move {
            let mut result = SlotResult {
                requests: 0,
                items: 0,
                errors: 0,
                first_error: None,
                latencies: Vec::new(),
            };
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let outcome = driver.call().await;
                if t0 < start {
                    continue;
                }
                match outcome {
                    Ok(items) => {
                        result.requests += 1;
                        result.items += items;
                        let nanos = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        result.latencies.push(nanos);
                    }
                    Err(e) => {
                        result.errors += 1;
                        if result.first_error.is_none() {
                            result.first_error = Some(e);
                        }
                    }
                }
            }
            result
        }));
    }
    tokio::time::sleep_until(start.into()).await;
    let writer = |pid| procfs::thread_cpu_seconds(pid, "audit-writer");
    let server_before = server_pid.and_then(procfs::cpu_seconds);
    let writer_before = server_pid.and_then(writer);
    let client_before = procfs::own_cpu_seconds();
    tokio::time::sleep_until(end.into()).await;
    let server_after = server_pid.and_then(procfs::cpu_seconds);
    let writer_after = server_pid.and_then(writer);
    let client_after = procfs::own_cpu_seconds();
    let mut out = Window {
        seconds: window.as_secs_f64(),
        server_cpu_seconds: server_before.zip(server_after).map(|(a, b)| b - a),
        client_cpu_seconds: client_before.zip(client_after).map(|(a, b)| b - a),
        writer_cpu_seconds: writer_before.zip(writer_after).map(|(a, b)| b - a),
        ..Window::default()
    };
    let mut latencies = Vec::new();
    for task in tasks {
        match task.await {
            Ok(slot) => {
                out.requests += slot.requests;
                out.items += slot.items;
                out.errors += slot.errors;
                if out.first_error.is_none() {
                    out.first_error = slot.first_error;
                }
                latencies.extend(slot.latencies);
            }
            Err(e) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| format!("load task failed: {e}"));
            }
        }
    }
    out.latency = Latency::of_nanos(&mut latencies);
    out
}
