//! The real binary as a process: acknowledged writes survive `kill -9`, one
//! daemon per SQLite file, and the default store needs no flags.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actionsd::proto::flyteidl2::actions::actions_service_client::ActionsServiceClient;
use common::*;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

conformance!(acknowledged_enqueues_survive_kill_9);

/// A daemon process and the address it reported.
struct Process {
    child: Child,
    addr: SocketAddr,
}

fn command(args: &[&str], data_home: Option<&Path>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_actionsd"));
    command
        .args(args)
        .env_remove("ACTIONSD_DATABASE_URL")
        .env_remove("ACTIONSD_CONFIG")
        .env_remove("ACTIONSD_LISTEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(home) = data_home {
        command.env("XDG_DATA_HOME", home).env("HOME", home);
    }
    command
}

/// Reads JSON log lines until the daemon reports where it listens.
async fn listening_address(output: impl AsyncRead + Unpin) -> SocketAddr {
    let mut lines = BufReader::new(output).lines();
    let find = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if entry["message"] == "actionsd listening" {
                return entry["address"].as_str().unwrap().parse().unwrap();
            }
        }
        panic!("the daemon exited without listening");
    };
    tokio::time::timeout(TIMEOUT, find)
        .await
        .expect("the daemon listens in time")
}

async fn spawn(url: Option<&str>, data_home: Option<&Path>) -> Process {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--log-format", "json"];
    if let Some(url) = url {
        args.extend(["--database-url", url]);
    }
    let mut child = command(&args, data_home).spawn().unwrap();
    let addr = listening_address(child.stdout.take().unwrap()).await;
    Process { child, addr }
}

async fn connect(addr: SocketAddr) -> Client {
    ActionsServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

async fn acknowledged_enqueues_survive_kill_9(db: TestDb) {
    let url = db.url();
    let mut first = spawn(Some(&url), None).await;
    let client = connect(first.addr).await;
    client
        .clone()
        .enqueue(task("r1", "a0", None))
        .await
        .unwrap();

    let acked = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(32));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..400 {
        let mut client = client.clone();
        let acked = acked.clone();
        let in_flight = in_flight.clone();
        calls.spawn(async move {
            let _permit = in_flight.acquire_owned().await.unwrap();
            let name = format!("c{i}");
            let result = client.enqueue(task("r1", &name, Some("a0"))).await;
            if result.is_ok() {
                acked.fetch_add(1, Ordering::SeqCst);
            }
            result.map(|_| name)
        });
    }
    // SIGKILL while enqueues are in flight.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while acked.load(Ordering::SeqCst) < 50 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress before the kill"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    first.child.start_kill().unwrap();
    first.child.wait().await.unwrap();
    let mut acknowledged = Vec::new();
    while let Some(result) = calls.join_next().await {
        if let Ok(name) = result.unwrap() {
            acknowledged.push(name);
        }
    }
    assert!(acknowledged.len() >= 50);

    let mut second = spawn(Some(&url), None).await;
    let mut client = connect(second.addr).await;
    let after = phases(&mut client, "r1", "a0").await;
    for name in &acknowledged {
        assert_eq!(
            after.get(name),
            Some(&QUEUED),
            "{name} was acknowledged but lost"
        );
    }
    second.child.start_kill().unwrap();
    second.child.wait().await.unwrap();
}

#[tokio::test]
async fn a_second_daemon_on_one_sqlite_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("actionsd.db").display());
    let mut first = spawn(Some(&url), None).await;

    let second = command(
        &["serve", "--listen", "127.0.0.1:0", "--database-url", &url],
        None,
    )
    .output();
    let second = tokio::time::timeout(TIMEOUT, second)
        .await
        .expect("the second daemon gives up in time")
        .unwrap();
    assert!(!second.status.success());
    let said = String::from_utf8_lossy(&second.stderr).to_string()
        + &String::from_utf8_lossy(&second.stdout);
    assert!(said.contains("another actionsd is using"), "{said}");

    // The first one is unaffected.
    let mut client = connect(first.addr).await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    first.child.start_kill().unwrap();
    first.child.wait().await.unwrap();
}

#[tokio::test]
async fn with_no_flags_the_store_is_a_file_in_the_data_directory() {
    let home = tempfile::tempdir().unwrap();
    let mut daemon = spawn(None, Some(home.path())).await;
    let mut client = connect(daemon.addr).await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    assert_eq!(phases(&mut client, "r1", "a0").await["a0"], QUEUED);
    assert!(home.path().join("actionsd").join("actionsd.db").is_file());
    daemon.child.start_kill().unwrap();
    daemon.child.wait().await.unwrap();
}
