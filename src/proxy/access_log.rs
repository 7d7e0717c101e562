//! The access log: one line per finished connection, written off the hot
//! path. A connection task only `try_send`s a small record into a bounded
//! channel; a thread of its own formats and writes (to stderr or a file).
//! When the channel is full the record is dropped and counted
//! (`beacon_proxy_access_log_dropped_total`): a slow disk never slows a
//! connection. A leaf: it uses nothing of the proxy.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use metrics::Counter;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::AccessLogTarget;
use crate::model::ServiceKey;
use crate::telemetry::LogFormat;

/// Records waiting for the writer; beyond this they are dropped.
pub const CAPACITY: usize = 16 * 1024;

/// How a connection ended, coarsely (the `end` field): a peer's FIN both
/// ways, a reset, a timeout, refused before any byte moved, or closed by
/// the drain deadline. `detail` says more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    Fin,
    Reset,
    Timeout,
    Refused,
    Drained,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Fin => "fin",
            End::Reset => "reset",
            End::Timeout => "timeout",
            End::Refused => "refused",
            End::Drained => "drained",
        }
    }
}

/// One finished connection.
#[derive(Clone, Debug)]
pub struct Record {
    /// When it ended.
    pub at: SystemTime,
    pub client: SocketAddr,
    pub service: ServiceKey,
    /// None when it was refused before an endpoint was reached.
    pub endpoint: Option<SocketAddr>,
    pub to_upstream: u64,
    pub to_client: u64,
    pub duration: Duration,
    pub end: End,
    /// The finer reason (`client_reset`, `idle_timeout`, `no_endpoints`...).
    pub detail: &'static str,
}

/// The sending side, held by the proxy's shared state.
pub struct AccessLog {
    tx: mpsc::Sender<Record>,
    dropped: Arc<AtomicU64>,
    dropped_metric: Counter,
}

impl AccessLog {
    /// Opens the target and starts the writer thread. Call after the
    /// metrics recorder is installed.
    pub fn start(target: &AccessLogTarget, format: LogFormat) -> io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Stderr => Box::new(io::stderr()),
            AccessLogTarget::File(path) => {
                Box::new(OpenOptions::new().create(true).append(true).open(path)?)
            }
        };
        let (log, rx) = Self::channel(CAPACITY);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(rx, out, format))?;
        Ok(log)
    }

    /// The sender and the receiving end, unconsumed (tests).
    pub(super) fn channel(capacity: usize) -> (AccessLog, mpsc::Receiver<Record>) {
        let (tx, rx) = mpsc::channel(capacity);
        let log = AccessLog {
            tx,
            dropped: Arc::default(),
            dropped_metric: metrics::counter!(crate::telemetry::PROXY_ACCESS_LOG_DROPPED),
        };
        (log, rx)
    }

    /// Queues a record; never waits (dropped and counted when full).
    pub fn log(&self, record: Record) {
        if self.tx.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.dropped_metric.increment(1);
        }
    }

    /// Records dropped so far because the writer fell behind.
    #[cfg(test)]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Writes records as they come, flushing whenever the queue is empty;
/// ends when every sender is gone.
fn write_loop(mut rx: mpsc::Receiver<Record>, out: Box<dyn Write + Send>, format: LogFormat) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    let mut warned = false;
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        let mut result = Ok(());
        while let Some(r) = next {
            result = result.and_then(|()| writeln!(out, "{}", line(&r, format)));
            next = rx.try_recv().ok();
        }
        if let Err(e) = result.and_then(|()| out.flush()) {
            if !warned {
                tracing::warn!(error = %e, "access log write failed; lines are lost");
            }
            warned = true;
        }
    }
}

#[derive(Serialize)]
struct JsonLine<'a> {
    timestamp: String,
    client: SocketAddr,
    service: String,
    endpoint: Option<SocketAddr>,
    to_upstream: u64,
    to_client: u64,
    duration_ms: f64,
    end: End,
    detail: &'a str,
}

/// One record as a line (no newline): `key=value` pairs, or one JSON object.
pub fn line(r: &Record, format: LogFormat) -> String {
    let timestamp = humantime::format_rfc3339_millis(r.at).to_string();
    let duration_ms = (r.duration.as_secs_f64() * 1e6).round() / 1e3;
    match format {
        LogFormat::Text => {
            let endpoint = r
                .endpoint
                .map_or_else(|| "-".to_string(), |e| e.to_string());
            format!(
                "{timestamp} access client={} service={} endpoint={endpoint} to_upstream={} to_client={} duration_ms={duration_ms} end={} detail={}",
                r.client,
                r.service,
                r.to_upstream,
                r.to_client,
                r.end.as_str(),
                r.detail
            )
        }
        LogFormat::Json => serde_json::to_string(&JsonLine {
            timestamp,
            client: r.client,
            service: r.service.to_string(),
            endpoint: r.endpoint,
            to_upstream: r.to_upstream,
            to_client: r.to_client,
            duration_ms,
            end: r.end,
            detail: r.detail,
        })
        .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(end: End) -> Record {
        Record {
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            client: "127.0.0.9:40000".parse().unwrap(),
            service: ServiceKey::new("default", "web"),
            endpoint: Some("127.0.0.11:8080".parse().unwrap()),
            to_upstream: 12,
            to_client: 3456,
            duration: Duration::from_micros(1500),
            end,
            detail: "fin",
        }
    }

    #[test]
    fn text_and_json_lines_carry_every_field() {
        let text = line(&record(End::Fin), LogFormat::Text);
        assert_eq!(
            text,
            "2023-11-14T22:13:20.123Z access client=127.0.0.9:40000 service=web.default \
             endpoint=127.0.0.11:8080 to_upstream=12 to_client=3456 duration_ms=1.5 end=fin detail=fin"
        );
        let mut r = record(End::Refused);
        r.endpoint = None;
        r.detail = "no_endpoints";
        let v: serde_json::Value = serde_json::from_str(&line(&r, LogFormat::Json)).unwrap();
        assert_eq!(v["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["client"], "127.0.0.9:40000");
        assert_eq!(v["service"], "web.default");
        assert!(v["endpoint"].is_null());
        assert_eq!(v["to_client"], 3456);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["end"], "refused");
        assert_eq!(v["detail"], "no_endpoints");
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let (log, mut rx) = AccessLog::channel(4);
        for _ in 0..10 {
            log.log(record(End::Fin));
        }
        assert_eq!(log.dropped(), 6);
        for _ in 0..4 {
            assert!(rx.try_recv().is_ok());
        }
        assert!(rx.try_recv().is_err());
        log.log(record(End::Reset));
        assert_eq!(log.dropped(), 6, "room again once the writer caught up");
    }

    #[test]
    fn the_writer_writes_every_queued_line_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::start(&AccessLogTarget::File(path.clone()), LogFormat::Json).unwrap();
        for end in [End::Fin, End::Reset, End::Timeout] {
            log.log(record(end));
        }
        drop(log);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 3 {
                let ends: Vec<String> = text
                    .lines()
                    .map(|l| {
                        serde_json::from_str::<serde_json::Value>(l).unwrap()["end"].to_string()
                    })
                    .collect();
                assert_eq!(ends, ["\"fin\"", "\"reset\"", "\"timeout\""]);
                return;
            }
            assert!(std::time::Instant::now() < deadline, "lines: {text:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
