//! Audit streaming to a SIEM (issue 16, item 5) through the real server: every committed
//! record reaches the file sink and a syslog receiver, across a `kill -9` of the server (the
//! binary as a child) and of the receiver (which dies mid-batch and comes back), repeating
//! only the unacknowledged tail; the file sink rotates; the lag is exported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tenant_kms::audit::stream::BATCH;
use tenant_kms::audit::stream::file::FileSinkConfig;
use tenant_kms::audit::stream::syslog::SyslogTarget;

/// Sequence numbers a receiver got, with how many times each.
type Received = Arc<Mutex<BTreeMap<u64, u32>>>;

/// The `seq` of each complete octet-counted RFC 5424 frame in `bytes` (an incomplete last
/// frame, cut by a dying sender, is not a record).
fn frames(bytes: &[u8]) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut rest = bytes;
    while let Some(space) = rest.iter().position(|&b| b == b' ') {
        let len: usize = std::str::from_utf8(&rest[..space])
            .unwrap()
            .parse()
            .unwrap();
        let body = &rest[space + 1..];
        if body.len() < len {
            break;
        }
        let text = std::str::from_utf8(&body[..len]).unwrap();
        assert!(text.starts_with('<') && text.contains(">1 "), "{text}");
        let json = text.split_once('\u{feff}').unwrap().1;
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        seqs.push(value["seq"].as_u64().unwrap());
        rest = &body[len..];
    }
    seqs
}

/// A test syslog receiver on `port` (0: any): reads each connection to its end, counts its
/// records and closes. With `die_mid_batch`, the first connection is read only in part and
/// then reset, and the receiver stops listening (it died).
struct Receiver {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start(port: u16, received: Received, die_mid_batch: bool) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let counted = received;
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                let stream = match listener.accept() {
                    Ok((stream, _)) => stream,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(e) => panic!("accept: {e}"),
                };
                stream.set_nonblocking(false).unwrap();
                let bytes = if die_mid_batch {
                    read_part_and_reset(stream)
                } else {
                    read_all(stream)
                };
                let mut received = counted.lock().unwrap();
                for seq in frames(&bytes) {
                    *received.entry(seq).or_default() += 1;
                }
                if die_mid_batch {
                    return; // the listener is dropped: connections are refused from now on
                }
            }
        });
        Self {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn wait_dead(mut self) {
        self.thread.take().unwrap().join().unwrap();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn read_all(mut stream: TcpStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    // A sender killed mid-batch ends the connection early; what arrived is kept.
    let _ = stream.read_to_end(&mut bytes);
    bytes
}

/// Reads what a first read gives, then closes without reading on: the kernel resets the
/// connection (unread data), so the sender sees its batch fail.
fn read_part_and_reset(mut stream: TcpStream) -> Vec<u8> {
    let mut bytes = vec![0u8; 600];
    let n = stream.read(&mut bytes).unwrap();
    bytes.truncate(n);
    std::thread::sleep(Duration::from_millis(50)); // let the rest arrive unread: a reset
    bytes
}

/// The `seq` of every line of the file sink (and its rotated files). `settled`: the sink is
/// stopped, so every line must be a whole record; otherwise (polling a running sink) a file
/// rotated away meanwhile, or a last line still being written, is skipped.
fn file_seqs(path: &Path, settled: bool) -> BTreeMap<u64, u32> {
    let mut seqs = BTreeMap::new();
    let dir = path.parent().unwrap();
    let name = path.file_name().unwrap().to_str().unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let file = entry.file_name().into_string().unwrap();
        if !file.starts_with(name) {
            continue;
        }
        let text = match std::fs::read_to_string(entry.path()) {
            Ok(text) => text,
            Err(e) if !settled && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{file}: {e}"),
        };
        for line in text.lines() {
            let value: serde_json::Value = match serde_json::from_str(line) {
                Ok(value) => value,
                Err(_) if !settled => continue,
                Err(e) => panic!("{file}: a line that is not a record ({e}): {line}"),
            };
            *seqs.entry(value["seq"].as_u64().unwrap()).or_default() += 1;
        }
    }
    seqs
}

/// Every sequence number of the data directory's audit log (`audit export`, read while the
/// server runs).
fn audit_seqs(data_dir: &Path) -> Vec<u64> {
    let (code, stdout, stderr) =
        run_cli(&["audit", "export", "--data-dir", data_dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// Polls until `delivered()` holds every number in `expected()`: a wait for a condition with a
/// generous bound, not a timed expectation.
async fn until_delivered(
    what: &str,
    expected: impl Fn() -> Vec<u64>,
    delivered: impl Fn() -> BTreeMap<u64, u32>,
) -> BTreeMap<u64, u32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let want = expected();
        let got = delivered();
        let missing: Vec<u64> = want
            .iter()
            .copied()
            .filter(|s| !got.contains_key(s))
            .collect();
        if !want.is_empty() && missing.is_empty() {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {} records never arrived, e.g. {:?}",
            missing.len(),
            want.len(),
            &missing[..missing.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Repeats in `got`: at most one batch's worth, all in one contiguous run of sequence
/// numbers (the unacknowledged tail of one delivery), per `runs_allowed` interruption.
fn assert_repeats_only_a_tail(what: &str, got: &BTreeMap<u64, u32>, runs_allowed: usize) {
    let repeated: Vec<u64> = got
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, _)| *s)
        .collect();
    let runs = repeated.windows(2).filter(|w| w[1] != w[0] + 1).count()
        + usize::from(!repeated.is_empty());
    assert!(runs <= runs_allowed, "{what}: repeats {repeated:?}");
    assert!(
        repeated.len() <= BATCH * runs_allowed,
        "{what}: {} repeats",
        repeated.len()
    );
    assert!(
        got.values().all(|n| *n <= 2),
        "{what}: a record came three times or more"
    );
}

async fn traffic(url: &str, token: &str, tenant: &str, n: usize) {
    let (mut keys, mut tenants, _) = clients(url, Some(token)).await;
    let _ = try_create_tenant(&mut tenants, tenant).await;
    for i in 0..n {
        encrypt(&mut keys, tenant, "c", format!("value {i}").as_bytes(), b"").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_reaches_both_sinks_across_a_kill_9_of_the_server() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let file = temp.path().join("siem/audit.jsonl");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let received: Received = Arc::default();
    let receiver = Receiver::start(0, Arc::clone(&received), false);
    let config = temp.path().join("tenant-kms.toml");
    std::fs::write(
        &config,
        format!(
            "audit_stream_file = \"{}\"\naudit_stream_file_max_bytes = 20000\n\
             audit_stream_file_keep = 1000\naudit_stream_syslog = \"tcp://127.0.0.1:{}\"\n",
            file.display(),
            receiver.port
        ),
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];

    let server = BinaryServer::start(&data_dir, &args).await;
    let token = server.admin_token();
    traffic(&server.url(), &token, "acme", 150).await;
    server.kill9();
    let cursor = |sink: &str| data_dir.join(format!("audit-stream-{sink}.cursor"));
    let server = BinaryServer::start(&data_dir, &args).await;
    traffic(&server.url(), &token, "globex", 150).await;

    let expected = || audit_seqs(&data_dir);
    until_delivered("file sink", expected, || file_seqs(&file, false)).await;
    let in_syslog = until_delivered("syslog", expected, || received.lock().unwrap().clone()).await;
    let all = expected();
    assert!(all.len() > 300);
    server.terminate().await;
    // Stopped: every line of the file is a whole record, and none is missing.
    let in_file = file_seqs(&file, true);
    assert!(all.iter().all(|seq| in_file.contains_key(seq)));
    assert_repeats_only_a_tail("file sink", &in_file, 1);
    assert_repeats_only_a_tail("syslog", &in_syslog, 1);
    // The file sink rotated (20 kB files), and the cursors are private files.
    let files = std::fs::read_dir(file.parent().unwrap()).unwrap().count();
    assert!(files >= 2, "{files} files");
    use std::os::unix::fs::PermissionsExt;
    for sink in ["file", "syslog"] {
        let mode = std::fs::metadata(cursor(sink))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{sink}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_dies_mid_batch_and_comes_back_gets_every_record() {
    let received: Received = Arc::default();
    let dying = Receiver::start(0, Arc::clone(&received), true);
    let port = dying.port;
    let server = TestServer::start_configured(|options| {
        options.audit_stream.syslog = Some(SyslogTarget::Tcp(format!("127.0.0.1:{port}")));
    })
    .await;
    traffic(&server.url(), &server.admin_token, "acme", 40).await;
    // The receiver read part of a batch and reset the connection, then stopped listening.
    dying.wait_dead();
    traffic(&server.url(), &server.admin_token, "acme", 40).await;
    let lag = || {
        let body =
            tenant_kms::metrics::scrape(&tenant_kms::service::server::metrics_extra(&server.state));
        body.lines()
            .find_map(|l| l.strip_prefix("tenant_kms_audit_stream_lag_records{sink=\"syslog\"} "))
            .map(|v| v.parse::<u64>().unwrap())
    };
    // Nothing is acknowledged while the receiver is down: the stream lags.
    let deadline = Instant::now() + Duration::from_secs(30);
    while lag().unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "no lag reported while the receiver is down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _back = Receiver::start(port, Arc::clone(&received), false);
    let reader = Arc::clone(&server.state.audit_reader);
    let expected = move || {
        let head = reader.head().unwrap().seq;
        (1..=head).collect()
    };
    let got = until_delivered("syslog", expected, || received.lock().unwrap().clone()).await;
    assert_repeats_only_a_tail("syslog", &got, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while lag() != Some(0) {
        assert!(Instant::now() < deadline, "lag stays {:?}", lag());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_sink_rotates_and_keeps_what_it_is_told() {
    let temp = tempfile::tempdir().unwrap();
    let file = temp.path().join("audit.jsonl");
    let sink = FileSinkConfig {
        path: file.clone(),
        max_bytes: 4000,
        keep: 3,
    };
    let server =
        TestServer::start_configured(|options| options.audit_stream.file = Some(sink)).await;
    let reader = Arc::clone(&server.state.audit_reader);
    // Six rounds of ten calls, each delivered before the next: each round's batch (over 4 kB)
    // does not fit beside the last one, so each starts a file.
    for _ in 0..6 {
        traffic(&server.url(), &server.admin_token, "acme", 10).await;
        let head = reader.head().unwrap().seq;
        until_delivered("file sink", || vec![head], || file_seqs(&file, false)).await;
    }
    server.stop().await;
    let seqs = file_seqs(&file, true);
    // Only the newest files are kept: the oldest records are gone, the rest whole and in order.
    assert!(!seqs.contains_key(&1), "nothing was rotated away");
    let kept: Vec<u64> = seqs.keys().copied().collect();
    assert!(kept.windows(2).all(|w| w[1] == w[0] + 1), "{kept:?}");
    assert!(seqs.values().all(|n| *n == 1));
    let mut names: Vec<String> = std::fs::read_dir(temp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("audit.jsonl"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "audit.jsonl",
            "audit.jsonl.1",
            "audit.jsonl.2",
            "audit.jsonl.3"
        ]
    );
}
