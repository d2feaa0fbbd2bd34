//! `actionsd executor`, the reference executor, run as a process against a
//! daemon: it runs a shell command per action and reports how it ended.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::process::Command;

conformance!(the_reference_executor_runs_reports_and_cancels);

/// Succeeds when the environment is right, fails for "bad", and runs
/// until stopped for "slow", leaving marker files.
const SCRIPT: &str = r#"
case "$ACTIONSD_ACTION" in
  bad) echo "boom: something broke" >&2; exit 3 ;;
  slow)
    trap 'touch "$MARKS/slow.stopped"; exit 143' TERM
    touch "$MARKS/slow.started"
    sleep 30 & wait ;;
  *) test "$ACTIONSD_OUTPUT_URI" = "s3://bucket/$ACTIONSD_RUN/$ACTIONSD_ACTION/$ACTIONSD_ATTEMPT" \
       && test "$ACTIONSD_INPUT_URI" = "s3://bucket/$ACTIONSD_RUN/$ACTIONSD_ACTION/inputs.pb" \
       && test "$ACTIONSD_PROJECT" = flytesnacks || exit 9 ;;
esac
"#;

async fn wait_for_file(path: &Path) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn the_reference_executor_runs_reports_and_cancels(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    let marks = tempfile::tempdir().unwrap();
    let mut executor = Command::new(env!("CARGO_BIN_EXE_actionsd"))
        .args([
            "executor",
            "--server",
            &format!("http://{}", daemon.addr),
            "--queue",
            "default",
            "--capacity",
            "4",
            "--heartbeat-interval",
            "200ms",
            "--exec",
            SCRIPT,
        ])
        .env("MARKS", marks.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // The parent runs elsewhere (queue "parents") while its children are
    // enqueued; this executor serves "default".
    let mut root = task("r1", "a0", None);
    if let Some(actionsd::proto::flyteidl2::actions::action::Spec::Task(t)) =
        root.action.as_mut().unwrap().spec.as_mut()
    {
        t.queue = "parents".into();
    }
    client.enqueue(root).await.unwrap();
    let mut watcher = Watcher::open(&mut client, "r1", "a0").await;
    for name in ["ok", "bad", "slow"] {
        client.enqueue(task("r1", name, Some("a0"))).await.unwrap();
    }

    let ok = watcher.until_phase("ok", SUCCEEDED).await;
    assert_eq!(ok.output_uri, "s3://bucket/r1/ok/1");
    let bad = watcher.until_phase("bad", FAILED).await;
    let error = bad.error.expect("an error for a failed command");
    assert_eq!(error.code, "ExitCode3");
    assert!(
        error.message.contains("boom: something broke"),
        "{}",
        error.message
    );
    assert_eq!(
        error.kind,
        actionsd::proto::flyteidl2::core::execution_error::ErrorKind::User as i32
    );

    // Aborting a running action stops its command.
    wait_for_file(&marks.path().join("slow.started")).await;
    client
        .abort(abort("r1", "slow", "no longer needed"))
        .await
        .unwrap();
    wait_for_file(&marks.path().join("slow.stopped")).await;
    watcher.until_phase("slow", ABORTED).await;

    // SIGTERM: the executor drains and exits cleanly.
    let pid = executor.id().unwrap().to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    let status = tokio::time::timeout(TIMEOUT, executor.wait())
        .await
        .expect("the executor exits in time")
        .unwrap();
    assert!(status.success(), "{status:?}");
    daemon.stop().await;
}
