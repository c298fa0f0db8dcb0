//! A real tenant-kms server in this test process, on an ephemeral loopback port with a
//! temporary data directory (as the server's own tests/common does; that harness is not
//! reachable from this crate's tests, which do not build the server binary).

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use tenant_kms::service::{AppState, ServiceOptions, server};

pub struct Server {
    pub addr: std::net::SocketAddr,
    pub data_dir: PathBuf,
    pub admin_token: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
    _temp: tempfile::TempDir,
}

impl Server {
    /// Starts a server with default options changed by `configure`.
    pub async fn start(configure: impl FnOnce(&mut ServiceOptions)) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("data");
        let mut options = ServiceOptions::new(&data_dir);
        options.min_deletion_window_seconds = 0;
        configure(&mut options);
        let state = Arc::new(
            tokio::task::spawn_blocking(move || AppState::open(options))
                .await
                .unwrap()
                .expect("server state opens"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            server::run(listener, state, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        let admin_token = std::fs::read_to_string(data_dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        Self {
            addr,
            data_dir,
            admin_token,
            shutdown: Some(tx),
            handle: Some(handle),
            _temp: temp,
        }
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap();
        }
    }
}
