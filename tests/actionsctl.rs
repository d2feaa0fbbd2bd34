//! actionsctl, the real binary, against a real daemon: every subcommand,
//! its output formats, its errors and exit codes, `watch` piped and on a
//! pseudo-terminal, and the README's walkthrough.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use actionsd::proto::flyteidl2::core::{primitive, SimpleType};
use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

conformance!(
    enqueue_from_flags_and_files,
    update_abort_and_signal,
    read_commands_show_actions_runs_and_history,
    errors_are_one_line_with_documented_exit_codes,
    watch_prints_one_line_per_change_when_piped,
    watch_exit_codes_say_how_the_action_ended,
    watch_draws_a_live_tree_on_a_terminal,
    watch_on_a_terminal_stops_on_ctrl_c_and_shows_the_cursor,
    watch_ends_with_unavailable_when_the_daemon_stops,
);

const CTL: &str = env!("CARGO_BIN_EXE_actionsctl");

/// What one run of actionsctl did.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "actionsctl failed: {self:?}");
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }

    /// Asserts a failure: exit code, and one `error: CODE: …` line.
    fn fails(&self, code: i32, prefix: &str) {
        assert_eq!(self.code, code, "{self:?}");
        assert!(self.stdout.is_empty(), "{self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line on stderr: {self:?}");
        assert!(
            lines[0].starts_with(prefix),
            "{:?} does not start with {prefix:?}",
            lines[0]
        );
    }
}

/// actionsctl with a clean environment: only ACTIONSD_SERVER is set.
fn command(server: &str) -> Command {
    let mut command = Command::new(CTL);
    command
        .env("ACTIONSD_SERVER", server)
        .env_remove("ACTIONSD_ORG")
        .env_remove("ACTIONSD_PROJECT")
        .env_remove("ACTIONSD_DOMAIN")
        .env_remove("ACTIONSD_OUTPUT")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

async fn run_ctl(server: &str, args: &[&str]) -> Out {
    let output = tokio::time::timeout(TIMEOUT, command(server).args(args).output())
        .await
        .expect("actionsctl ends in time")
        .expect("actionsctl runs");
    Out {
        code: output.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

async fn ctl(daemon: &Daemon, args: &[&str]) -> Out {
    run_ctl(&format!("http://{}", daemon.addr), args).await
}

async fn enqueue_from_flags_and_files(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;

    // From flags: a root with a run queue, a child task.
    let out = ctl(
        &daemon,
        &[
            "enqueue",
            "r1",
            "a0",
            "--run-queue",
            "gpu",
            "--max-concurrency",
            "2",
        ],
    )
    .await
    .ok();
    assert_eq!(out.stdout, "enqueued flytesnacks/development/r1/a0\n");
    ctl(
        &daemon,
        &[
            "enqueue", "r1", "flags", "--parent", "a0", "--task", "t.flags",
        ],
    )
    .await
    .ok();
    // The same again is OK (idempotent); other content is a conflict.
    ctl(
        &daemon,
        &[
            "enqueue", "r1", "flags", "--parent", "a0", "--task", "t.flags",
        ],
    )
    .await
    .ok();
    ctl(
        &daemon,
        &[
            "enqueue", "r1", "flags", "--parent", "a0", "--task", "other",
        ],
    )
    .await
    .fails(5, "error: ALREADY_EXISTS: ");

    // --dry-run prints the request; it is a valid file to enqueue from.
    let dry = ctl(
        &daemon,
        &[
            "enqueue",
            "r1",
            "yaml",
            "--parent",
            "a0",
            "--queue",
            "cpu",
            "--dry-run",
            "-o",
            "yaml",
        ],
    )
    .await
    .ok();
    assert!(dry.stdout.contains("queue: cpu"), "{}", dry.stdout);
    assert!(dry.stdout.contains("shortName: yaml"), "{}", dry.stdout);
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("request.yaml");
    std::fs::write(&yaml, &dry.stdout).unwrap();
    ctl(&daemon, &["enqueue", "-f", yaml.to_str().unwrap()])
        .await
        .ok();

    // JSON with an opaque TaskSpec as an object, from stdin.
    let json = r#"{"action": {"actionId": {"run": {"project": "flytesnacks", "domain": "development", "name": "r1"}, "name": "json"},
        "parentActionName": "a0", "inputUri": "s3://b/i", "runOutputBase": "s3://b/o",
        "task": {"id": {"name": "t.json", "version": "v2"}, "spec": {"shortName": "from-json", "taskTemplate": {"type": "python-task"}}}}}"#;
    let mut child = command(&format!("http://{}", daemon.addr))
        .args(["enqueue", "-f", "-", "-o", "json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(json.as_bytes()).await.unwrap();
    }
    let output = tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "{}");

    // A root from YAML, its RunSpec an object: its queue becomes the run's.
    let root = dir.path().join("root.yml");
    std::fs::write(
        &root,
        "action:\n  actionId: {run: {project: flytesnacks, domain: development, name: r2}, name: root}\n  \
         inputUri: s3://b/i\n  runOutputBase: s3://b/o\n  task: {id: {name: t.root}}\n\
         runSpec:\n  queue: gpu2\n",
    )
    .unwrap();
    ctl(&daemon, &["enqueue", "-f", root.to_str().unwrap()])
        .await
        .ok();

    // A condition from flags.
    ctl(
        &daemon,
        &[
            "enqueue",
            "r1",
            "gate",
            "--parent",
            "a0",
            "--condition",
            "--type",
            "int",
            "--prompt",
            "How many?",
            "--condition-timeout",
            "1h",
        ],
    )
    .await
    .ok();

    let phases = phases(&mut client, "r1", "a0").await;
    for (name, phase) in [
        ("a0", QUEUED),
        ("flags", QUEUED),
        ("yaml", QUEUED),
        ("json", QUEUED),
        ("gate", PAUSED),
    ] {
        assert_eq!(phases.get(name), Some(&phase), "{name}: {phases:?}");
    }

    // What was stored, read back through the read API.
    let json = ctl(&daemon, &["get", "r1", "json", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(json["spec"]["task"]["spec"]["shortName"], "from-json");
    assert_eq!(json["spec"]["task"]["id"]["version"], "v2");
    let a0 = ctl(&daemon, &["get", "r1", "a0", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(a0["action"]["queue"], "gpu", "the run queue: {a0}");
    let flags = ctl(&daemon, &["get", "r1", "flags", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(flags["action"]["queue"], "gpu", "inherited: {flags}");
    assert_eq!(flags["spec"]["task"]["id"]["name"], "t.flags");
    assert_eq!(
        flags["spec"]["inputUri"],
        "file:///tmp/actionsd/flytesnacks/development/r1/flags/inputs.pb"
    );
    let yaml = ctl(&daemon, &["get", "r1", "yaml", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(yaml["action"]["queue"], "cpu");
    let gate = ctl(&daemon, &["get", "r1", "gate", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(gate["spec"]["condition"]["type"]["simple"], "INTEGER");
    assert_eq!(gate["spec"]["condition"]["prompt"], "How many?");
    let r2 = ctl(&daemon, &["get", "r2", "root", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(r2["action"]["queue"], "gpu2", "{r2}");
    assert_eq!(gate["spec"]["condition"]["timeout"], "3600s");
    assert!(gate["action"]["deadline"].is_string(), "{gate}");
    daemon.stop().await;
}

async fn update_abort_and_signal(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    let mut watcher = Watcher::open(&mut client, "r1", "a0").await;
    for name in ["b", "c"] {
        client.enqueue(task("r1", name, Some("a0"))).await.unwrap();
    }
    client
        .enqueue(condition("r1", "ok", "a0", SimpleType::Boolean))
        .await
        .unwrap();
    client
        .enqueue(condition("r1", "n", "a0", SimpleType::Integer))
        .await
        .unwrap();

    // update: forward moves, then a stale attempt is refused.
    let out = ctl(
        &daemon,
        &["update", "r1", "b", "--attempt", "2", "--phase", "RUNNING"],
    )
    .await
    .ok();
    assert_eq!(
        out.stdout,
        "updated flytesnacks/development/r1/b: attempt 2 RUNNING\n"
    );
    watcher.until_phase("b", RUNNING).await;
    ctl(
        &daemon,
        &[
            "update",
            "r1",
            "b",
            "--attempt",
            "2",
            "--phase",
            "succeeded",
        ],
    )
    .await
    .ok();
    watcher.until_phase("b", SUCCEEDED).await;
    ctl(
        &daemon,
        &["update", "r1", "b", "--attempt", "1", "--phase", "running"],
    )
    .await
    .fails(5, "error: FAILED_PRECONDITION: ");

    // signal: typed by the condition's declaration, parent looked up.
    let out = ctl(&daemon, &["signal", "r1", "ok", "yes"]).await.ok();
    assert_eq!(
        out.stdout,
        "signalled flytesnacks/development/r1/ok with true\n"
    );
    let ok = watcher.until_phase("ok", SUCCEEDED).await;
    assert_eq!(
        ok.value,
        Some(primitive_literal(primitive::Value::Boolean(true)))
    );
    // The same value again is OK; another one is a conflict.
    ctl(&daemon, &["signal", "r1", "ok", "true"]).await.ok();
    ctl(&daemon, &["signal", "r1", "ok", "false"])
        .await
        .fails(5, "error: FAILED_PRECONDITION: ");
    // Explicit type and parent, no lookup; a mismatched type is refused by
    // the daemon, a malformed value by actionsctl.
    ctl(
        &daemon,
        &[
            "signal", "r1", "n", "true", "--type", "bool", "--parent", "a0",
        ],
    )
    .await
    .fails(3, "error: INVALID_ARGUMENT: ");
    ctl(&daemon, &["signal", "r1", "n", "many"]).await.fails(
        3,
        "error: INVALID_ARGUMENT: value \"many\" is not an integer",
    );
    ctl(
        &daemon,
        &[
            "signal", "r1", "n", "-3", "--type", "int", "--parent", "a0", "-o", "json",
        ],
    )
    .await
    .ok();
    let n = watcher.until_phase("n", SUCCEEDED).await;
    assert_eq!(
        n.value,
        Some(primitive_literal(primitive::Value::Integer(-3)))
    );
    ctl(&daemon, &["signal", "r1", "c", "1"])
        .await
        .fails(5, "error: FAILED_PRECONDITION: ");

    // abort: cascades to unfinished descendants, keeps finished ones.
    let out = ctl(
        &daemon,
        &["abort", "r1", "a0", "--reason", "enough", "--by", "ops"],
    )
    .await
    .ok();
    assert_eq!(out.stdout, "aborted flytesnacks/development/r1/a0\n");
    let c = watcher.until_phase("c", ABORTED).await;
    assert_eq!(c.error.unwrap().message, "enough");
    watcher.until_phase("a0", ABORTED).await;
    assert_eq!(watcher.phases["b"], SUCCEEDED);
    ctl(&daemon, &["abort", "r1", "a0"])
        .await
        .fails(5, "error: FAILED_PRECONDITION: ");
    let a0 = ctl(&daemon, &["get", "r1", "a0", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(a0["action"]["abortReason"], "enough");
    daemon.stop().await;
}

async fn read_commands_show_actions_runs_and_history(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    for name in ["b1", "b2", "b3"] {
        client.enqueue(task("r1", name, Some("a0"))).await.unwrap();
    }
    client.enqueue(task("r2", "root", None)).await.unwrap();
    client
        .update(status_update("r1", "b1", 1, RUNNING))
        .await
        .unwrap();
    client
        .update(status_update("r1", "b1", 1, SUCCEEDED))
        .await
        .unwrap();

    // get: a table of fields, or the response as JSON/YAML.
    let table = ctl(&daemon, &["get", "r1", "b1"]).await.ok().stdout;
    assert!(table.contains("Action:"), "{table}");
    assert!(table.contains("flytesnacks/development/r1/b1"), "{table}");
    assert!(table.contains("SUCCEEDED"), "{table}");
    assert!(table.contains("tasks.b1 (version v1)"), "{table}");
    let yaml = ctl(&daemon, &["get", "r1", "b1", "-o", "yaml"])
        .await
        .ok()
        .stdout;
    assert!(yaml.contains("phase: ACTION_PHASE_SUCCEEDED"), "{yaml}");

    // ls: filters and paging.
    let ls = ctl(
        &daemon,
        &["ls", "--run", "r1", "--parent", "a0", "-o", "json"],
    )
    .await
    .ok()
    .json();
    let names: Vec<&str> = ls["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b1", "b2", "b3"]);
    let queued = ctl(
        &daemon,
        &["ls", "--run", "r1", "--phase", "queued", "-o", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(queued["actions"].as_array().unwrap().len(), 3, "{queued}");
    let by_queue = ctl(&daemon, &["ls", "--queue", "default", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(
        by_queue["actions"].as_array().unwrap().len(),
        5,
        "{by_queue}"
    );
    let none = ctl(&daemon, &["ls", "--queue", "gpu", "-o", "json"])
        .await
        .ok()
        .json();
    assert!(
        none["actions"].as_array().is_none_or(Vec::is_empty),
        "{none}"
    );
    let page = ctl(
        &daemon,
        &["ls", "--run", "r1", "--limit", "2", "-o", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(page["actions"].as_array().unwrap().len(), 2);
    let token = page["nextPageToken"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let rest = ctl(
        &daemon,
        &[
            "ls",
            "--run",
            "r1",
            "--limit",
            "2",
            "--page-token",
            &token,
            "-o",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(rest["actions"].as_array().unwrap().len(), 2);
    let all = ctl(&daemon, &["ls", "--limit", "1", "--all", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(all["actions"].as_array().unwrap().len(), 5, "{all}");
    let table = ctl(&daemon, &["ls", "--run", "r1", "--limit", "2"])
        .await
        .ok();
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert!(lines[0].starts_with("RUN "), "{}", table.stdout);
    assert_eq!(lines.len(), 3, "{}", table.stdout);
    assert!(table.stderr.contains("--page-token"), "{table:?}");

    // runs: newest first, with phase counts.
    let runs = ctl(&daemon, &["runs"]).await.ok().stdout;
    let lines: Vec<&str> = runs.lines().collect();
    assert!(lines[0].starts_with("RUN "), "{runs}");
    assert!(lines[1].starts_with("r2 "), "{runs}");
    assert!(lines[2].starts_with("r1 "), "{runs}");
    assert!(lines[2].contains("3 QUEUED, 1 SUCCEEDED"), "{runs}");
    let other = ctl(&daemon, &["runs", "--project", "elsewhere", "-o", "json"])
        .await
        .ok()
        .json();
    assert!(
        other["runs"].as_array().is_none_or(Vec::is_empty),
        "{other}"
    );

    // history: every accepted change, oldest first.
    let history = ctl(&daemon, &["history", "r1", "b1", "-o", "json"])
        .await
        .ok()
        .json();
    let phases: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "ACTION_PHASE_QUEUED",
            "ACTION_PHASE_RUNNING",
            "ACTION_PHASE_SUCCEEDED"
        ]
    );
    let table = ctl(&daemon, &["history", "r1", "b1"]).await.ok().stdout;
    assert_eq!(table.lines().count(), 4, "{table}");
    daemon.stop().await;
}

async fn errors_are_one_line_with_documented_exit_codes(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    // Unknown actions: NOT_FOUND, exit code 4, the daemon's message.
    ctl(&daemon, &["get", "r1", "nope"]).await.fails(
        4,
        "error: NOT_FOUND: action flytesnacks/development/r1/nope not found",
    );
    ctl(&daemon, &["abort", "r1", "nope"])
        .await
        .fails(4, "error: NOT_FOUND: ");
    ctl(
        &daemon,
        &[
            "update",
            "r1",
            "nope",
            "--attempt",
            "1",
            "--phase",
            "running",
        ],
    )
    .await
    .fails(4, "error: NOT_FOUND: ");
    ctl(&daemon, &["history", "r1", "nope"])
        .await
        .fails(4, "error: NOT_FOUND: ");
    ctl(&daemon, &["enqueue", "r1", "child", "--parent", "missing"])
        .await
        .fails(4, "error: NOT_FOUND: ");
    ctl(&daemon, &["watch", "nope", "--exit-on-terminal"])
        .await
        .fails(4, "error: NOT_FOUND: ");

    // Invalid input: refused by the daemon or before sending, exit code 3.
    ctl(&daemon, &["enqueue", "r1", "a0", "--input-uri", ""])
        .await
        .fails(
            3,
            "error: INVALID_ARGUMENT: action.input_uri: must not be empty",
        );
    ctl(&daemon, &["enqueue", "r1", &"x".repeat(40)])
        .await
        .fails(
            3,
            "error: INVALID_ARGUMENT: action.action_id.name: is 40 bytes long",
        );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"action\": 3}").unwrap();
    ctl(&daemon, &["enqueue", "-f", bad.to_str().unwrap()])
        .await
        .fails(3, "error: INVALID_ARGUMENT: ");
    std::fs::write(&bad, "{not json").unwrap();
    ctl(&daemon, &["enqueue", "-f", bad.to_str().unwrap()])
        .await
        .fails(3, "error: INVALID_ARGUMENT: ");
    let missing = dir.path().join("missing.yaml");
    ctl(&daemon, &["enqueue", "-f", missing.to_str().unwrap()])
        .await
        .fails(3, "error: INVALID_ARGUMENT: cannot read");

    // Bad command lines: clap's usage errors, exit code 2.
    let out = ctl(
        &daemon,
        &["update", "r1", "a0", "--attempt", "0", "--phase", "running"],
    )
    .await;
    assert_eq!(out.code, 2, "{out:?}");
    let out = ctl(&daemon, &["ls", "--phase", "sleeping"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("sleeping"), "{out:?}");
    let out = ctl(&daemon, &["frobnicate"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    run_ctl("http://[::1", &["get", "r1", "a0"])
        .await
        .fails(2, "error: --server \"http://[::1\" is not a valid URL");

    // No daemon: UNAVAILABLE, exit code 6, and it says where it tried.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let nowhere = format!("http://127.0.0.1:{port}");
    let out = run_ctl(&nowhere, &["get", "r1", "a0"]).await;
    out.fails(
        6,
        &format!("error: UNAVAILABLE: cannot connect to {nowhere}"),
    );
    run_ctl(&nowhere, &["health", "--wait", "300ms"])
        .await
        .fails(
            6,
            &format!("error: DEADLINE_EXCEEDED: {nowhere} did not report SERVING within --wait 300ms; last try: UNAVAILABLE: cannot connect"),
        );
    let out = ctl(&daemon, &["health"]).await.ok();
    assert!(out.stdout.contains("is serving"), "{out:?}");
    daemon.stop().await;
}

/// Reads lines of a piped `actionsctl watch` until one contains `needle`.
async fn read_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    seen: &mut Vec<String>,
    needle: &str,
) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no line with {needle:?} in time; got {seen:#?}"))
            .unwrap()
            .unwrap_or_else(|| panic!("watch ended before {needle:?}; got {seen:#?}"));
        seen.push(line.clone());
        if line.contains(needle) {
            return;
        }
    }
}

async fn watch_prints_one_line_per_change_when_piped(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    client.enqueue(task("r1", "b", Some("a0"))).await.unwrap();

    let mut watch = command(&format!("http://{}", daemon.addr))
        .args(["watch", "r1", "--until-done"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    // The snapshot: one line per action, in whatever order.
    let snapshot = [
        "action=a0 parent=- phase=QUEUED attempt=1",
        "action=b parent=a0 phase=QUEUED attempt=1",
    ];
    for line in snapshot {
        if !seen.iter().any(|l| l == line) {
            read_until(&mut lines, &mut seen, line).await;
        }
    }
    assert_eq!(seen.len(), 2, "{seen:#?}");

    // Live changes, including an action enqueued after the watch began.
    client.enqueue(task("r1", "late", Some("b"))).await.unwrap();
    read_until(&mut lines, &mut seen, "action=late parent=b phase=QUEUED").await;
    client
        .update(status_update("r1", "b", 1, RUNNING))
        .await
        .unwrap();
    read_until(
        &mut lines,
        &mut seen,
        "action=b parent=a0 phase=RUNNING attempt=1",
    )
    .await;
    client
        .abort(abort("r1", "late", "not needed"))
        .await
        .unwrap();
    read_until(&mut lines, &mut seen, "action=late parent=b phase=ABORTED").await;
    let aborted = seen.last().unwrap().clone();
    assert!(
        aborted.contains("error=\"Aborted: not needed (USER)\""),
        "{aborted}"
    );
    assert!(aborted.contains(" duration="), "{aborted}");

    // The root ends: the watch ends with 0.
    client
        .update(status_update("r1", "a0", 1, SUCCEEDED))
        .await
        .unwrap();
    read_until(&mut lines, &mut seen, "action=a0 parent=- phase=SUCCEEDED").await;
    let status = tokio::time::timeout(TIMEOUT, watch.wait())
        .await
        .expect("watch exits after the root ended")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(lines.next_line().await.unwrap().is_none());
    daemon.stop().await;
}

async fn watch_exit_codes_say_how_the_action_ended(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    for (name, phase) in [("ok", SUCCEEDED), ("bad", FAILED), ("late", 8)] {
        client.enqueue(task("r1", name, Some("a0"))).await.unwrap();
        client
            .update(status_update("r1", name, 1, phase))
            .await
            .unwrap();
    }
    client
        .enqueue(task("r1", "gone", Some("a0")))
        .await
        .unwrap();
    client.abort(abort("r1", "gone", "stop")).await.unwrap();
    for (name, code) in [("ok", 0), ("bad", 10), ("gone", 11), ("late", 12)] {
        let out = ctl(
            &daemon,
            &["watch", "r1", "--action", name, "--exit-on-terminal"],
        )
        .await;
        assert_eq!(out.code, code, "{name}: {out:?}");
        assert!(out.stdout.contains(&format!("action={name} ")), "{out:?}");
    }
    // As JSON: one WatchRunResponse per line, the sentinel among them.
    let out = ctl(
        &daemon,
        &[
            "watch",
            "r1",
            "--action",
            "bad",
            "--exit-on-terminal",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(out.code, 10, "{out:?}");
    let messages: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(messages.len(), 6, "{messages:#?}");
    assert_eq!(messages[5]["sentinel"], true);
    assert!(messages[..5]
        .iter()
        .all(|m| m["action"]["id"]["name"].is_string()));
    // An unknown action of a known run.
    ctl(
        &daemon,
        &["watch", "r1", "--action", "nope", "--exit-on-terminal"],
    )
    .await
    .fails(
        4,
        "error: NOT_FOUND: action flytesnacks/development/r1/nope not found",
    );
    daemon.stop().await;
}

/// A pseudo-terminal running actionsctl, its output fed to a vt100 screen.
struct Terminal {
    parser: vt100::Parser,
    output: std::sync::mpsc::Receiver<Vec<u8>>,
    /// Keys typed at the terminal.
    input: Box<dyn std::io::Write + Send>,
    child: Box<dyn portable_pty::Child + Send + Sync>,
}

const ROWS: u16 = 24;
const COLS: u16 = 100;

impl Terminal {
    fn spawn(server: &str, args: &[&str]) -> Self {
        use portable_pty::{native_pty_system, CommandBuilder, PtySize};
        let pair = native_pty_system()
            .openpty(PtySize {
                rows: ROWS,
                cols: COLS,
                pixel_width: 0,
                pixel_height: 0,
            })
            .unwrap();
        let mut command = CommandBuilder::new(CTL);
        command.args(args);
        command.env("ACTIONSD_SERVER", server);
        command.env("TERM", "xterm-256color");
        for var in [
            "ACTIONSD_ORG",
            "ACTIONSD_PROJECT",
            "ACTIONSD_DOMAIN",
            "ACTIONSD_OUTPUT",
            "NO_COLOR",
        ] {
            command.env_remove(var);
        }
        let child = pair.slave.spawn_command(command).unwrap();
        drop(pair.slave);
        let mut reader = pair.master.try_clone_reader().unwrap();
        let input = pair.master.take_writer().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Ends when the child's side closes (EOF or EIO).
        std::thread::spawn(move || {
            let _master = pair.master;
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Self {
            parser: vt100::Parser::new(
                std::num::NonZeroU16::new(ROWS).unwrap(),
                std::num::NonZeroU16::new(COLS).unwrap(),
                0,
            ),
            output: rx,
            input,
            child,
        }
    }

    /// Feeds output to the screen until `done` holds for it.
    async fn until(&mut self, what: &str, done: impl Fn(&vt100::Screen) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !done(self.parser.screen()) {
            assert!(
                Instant::now() < deadline,
                "screen never showed {what}:\n{}",
                self.parser.screen().contents()
            );
            self.pump(Duration::from_millis(50)).await;
        }
    }

    /// Takes whatever output arrived within `wait`.
    async fn pump(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            match self.output.try_recv() {
                Ok(bytes) => self.parser.process(&bytes),
                Err(_) if Instant::now() >= deadline => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Waits for the process to exit; its exit code.
    async fn exit_code(&mut self) -> u32 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            self.pump(Duration::from_millis(20)).await;
            if let Some(status) = self.child.try_wait().unwrap() {
                // The last output may still be in the channel.
                self.pump(Duration::from_millis(200)).await;
                return status.exit_code();
            }
            assert!(Instant::now() < deadline, "actionsctl did not exit in time");
        }
    }

    /// The screen's rows, trailing blanks trimmed, durations masked with
    /// the layout kept: a duration and the blanks before it become `<t>`,
    /// right-aligned in the same width.
    fn snapshot(&self) -> Vec<String> {
        let contents = self.parser.screen().contents();
        let mut rows: Vec<String> = contents.lines().map(mask_durations).collect();
        while rows.last().is_some_and(String::is_empty) {
            rows.pop();
        }
        rows
    }

    /// The colour of the first cell of `text` in the tree (below the
    /// header row).
    fn color_of(&self, text: &str) -> vt100::Color {
        let screen = self.parser.screen();
        for row in 1..ROWS {
            let line = screen.contents_between(row, 0, row, COLS);
            if let Some(col) = line.find(text) {
                let col = line[..col].chars().count();
                return screen
                    .cell(row, u16::try_from(col).unwrap())
                    .unwrap()
                    .fgcolor();
            }
        }
        panic!("{text:?} not on screen:\n{}", screen.contents());
    }
}

fn mask_durations(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let blanks = chars[i..].iter().take_while(|c| **c == ' ').count();
        let token: String = chars[i + blanks..]
            .iter()
            .take_while(|c| **c != ' ')
            .collect();
        let width = blanks + token.chars().count();
        if is_duration(&token) {
            out.push_str(&format!("{:>width$}", "<t>"));
        } else {
            out.extend(&chars[i..i + width]);
        }
        i += width.max(1);
    }
    out.trim_end().to_owned()
}

/// `850ms`, `12.3s`, `4m05s`, `2h03m`.
fn is_duration(token: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.');
    if let Some(ms) = token.strip_suffix("ms") {
        return digits(ms);
    }
    if let Some(rest) = token.strip_suffix('s') {
        return digits(rest)
            || rest
                .split_once('m')
                .is_some_and(|(m, s)| digits(m) && digits(s));
    }
    if let Some(rest) = token.strip_suffix('m') {
        return rest
            .split_once('h')
            .is_some_and(|(h, m)| digits(h) && digits(m));
    }
    false
}

async fn watch_draws_a_live_tree_on_a_terminal(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    client
        .enqueue(task("r1", "fetch", Some("a0")))
        .await
        .unwrap();
    client
        .enqueue(task("r1", "train", Some("a0")))
        .await
        .unwrap();
    client
        .update(status_update("r1", "fetch", 1, SUCCEEDED))
        .await
        .unwrap();

    let mut term = Terminal::spawn(
        &format!("http://{}", daemon.addr),
        &["watch", "r1", "--exit-on-terminal"],
    );
    term.until("the snapshot", |s| s.contents().contains("train"))
        .await;

    // Live: a new grandchild appears under its parent, phases change in
    // place.
    client
        .enqueue(task("r1", "eval", Some("train")))
        .await
        .unwrap();
    client
        .update(status_update("r1", "train", 1, RUNNING))
        .await
        .unwrap();
    term.until("eval under train, train running", |s| {
        let c = s.contents();
        c.contains("└─ eval") && c.contains("RUNNING")
    })
    .await;
    client.abort(abort("r1", "eval", "flaky")).await.unwrap();
    client
        .update(status_update("r1", "train", 1, SUCCEEDED))
        .await
        .unwrap();
    // Changes of different actions may arrive in any order: wait for these
    // before the root ends the watch.
    term.until("eval aborted, train succeeded", |s| {
        let c = s.contents();
        c.contains("Aborted: flaky") && !c.contains("RUNNING")
    })
    .await;
    client
        .update(status_update("r1", "a0", 1, SUCCEEDED))
        .await
        .unwrap();
    assert_eq!(term.exit_code().await, 0);
    assert_eq!(
        term.snapshot(),
        [
            "run flytesnacks/development/r1  4 actions: 3 SUCCEEDED, 1 ABORTED",
            "a0          SUCCEEDED  #1       <t>",
            "├─ fetch    SUCCEEDED  #1       <t>",
            "└─ train    SUCCEEDED  #1       <t>",
            "   └─ eval  ABORTED    #1       <t>  Aborted: flaky (USER)",
        ]
        .map(|row| row.to_owned())
        .to_vec(),
        "the screen:\n{}",
        term.parser.screen().contents()
    );
    // Redrawn in place: the tree is drawn once, not once per change.
    let contents = term.parser.screen().contents();
    assert_eq!(contents.matches("run flytesnacks").count(), 1, "{contents}");
    // Colours say how each action is doing; names stay uncoloured.
    assert_eq!(term.color_of("├─ fetch"), vt100::Color::Default);
    assert_eq!(term.color_of("ABORTED"), vt100::Color::Idx(11));
    assert_eq!(term.color_of("SUCCEEDED"), vt100::Color::Idx(10));
    daemon.stop().await;
}

async fn watch_on_a_terminal_stops_on_ctrl_c_and_shows_the_cursor(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    let mut term = Terminal::spawn(&format!("http://{}", daemon.addr), &["watch", "r1"]);
    term.until("the tree", |s| s.contents().contains("a0  QUEUED"))
        .await;
    assert!(
        term.parser.screen().hide_cursor(),
        "the cursor is hidden while drawing"
    );
    // Ctrl-C: the terminal sends SIGINT to the watch.
    use std::io::Write;
    term.input.write_all(b"\x03").unwrap();
    term.input.flush().unwrap();
    assert_eq!(term.exit_code().await, 0);
    assert!(
        !term.parser.screen().hide_cursor(),
        "the cursor is shown again"
    );
    assert!(term.parser.screen().contents().contains("a0  QUEUED"));
    daemon.stop().await;
}

async fn watch_ends_with_unavailable_when_the_daemon_stops(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let mut client = daemon.client().await;
    client.enqueue(task("r1", "a0", None)).await.unwrap();
    let mut watch = command(&format!("http://{}", daemon.addr))
        .args(["watch", "r1", "--exit-on-terminal"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    read_until(&mut lines, &mut seen, "action=a0 parent=- phase=QUEUED").await;
    // A daemon that shuts down ends streams with UNAVAILABLE: exit code 6,
    // one line saying so.
    daemon.stop().await;
    let output = tokio::time::timeout(TIMEOUT, watch.wait_with_output())
        .await
        .expect("watch exits when the daemon stops")
        .unwrap();
    assert_eq!(output.status.code(), Some(6), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: UNAVAILABLE: "), "{stderr}");
}

#[test]
fn help_completions_and_man_page() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(CTL).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let help = run(&["--help"]);
    for needle in [
        "Exit codes:",
        "4  NOT_FOUND",
        "10  watch --exit-on-terminal: the action FAILED",
        "actionsctl enqueue r1 main",
        "[env: ACTIONSD_SERVER=",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
    let watch = run(&["watch", "--help"]);
    assert!(watch.contains("--until-done"), "{watch}");
    assert!(run(&["completions", "bash"]).contains("_actionsctl()"));
    assert!(run(&["completions", "zsh"]).starts_with("#compdef actionsctl"));
    assert!(run(&["completions", "fish"]).contains("complete -c actionsctl"));
    let man = run(&["man"]);
    assert!(man.contains(".TH actionsctl"), "{man}");
}

/// The walkthrough in README.md, between its markers, run as printed with
/// bash against a daemon on a free loopback port and a fresh SQLite file.
#[tokio::test]
async fn the_readme_walkthrough_runs_as_printed() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let script = walkthrough(&readme);
    assert!(script.contains("actionsctl watch"), "{script}");

    let dir = tempfile::tempdir().unwrap();
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let bin = Path::new(CTL).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut bash = Command::new("bash");
    bash.arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(dir.path())
        .env("PATH", path)
        .env("ACTIONSD_LISTEN", format!("127.0.0.1:{port}"))
        .env("ACTIONSD_SERVER", format!("http://127.0.0.1:{port}"))
        .env("XDG_DATA_HOME", dir.path().join("data"))
        .env("HOME", dir.path())
        .env_remove("ACTIONSD_DATABASE_URL")
        .env_remove("ACTIONSD_CONFIG")
        .env_remove("ACTIONSD_PROJECT")
        .env_remove("ACTIONSD_DOMAIN")
        .env_remove("ACTIONSD_ORG")
        .env_remove("ACTIONSD_OUTPUT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let child = bash.spawn().unwrap();
    let pgid = libc::pid_t::try_from(child.id().unwrap()).unwrap();
    // The script's own group (process_group(0)): never 0 or 1, which
    // killpg would read as "this group" or "every process".
    assert!(pgid > 1, "unexpected process group {pgid}");
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output()).await;
    // Whatever happened, nothing the script started outlives the test.
    // Signalled directly, not through kill(1) (see Cargo.toml).
    // SAFETY: killpg only sends a signal; the group is the script's.
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
    let output = output.expect("the walkthrough ends in time").unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the walkthrough failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    for needle in [
        "is serving",
        "enqueued flytesnacks/development/demo/main",
        "action=main parent=- phase=SUCCEEDED",
        "action=train parent=main phase=SUCCEEDED",
        "aborted flytesnacks/development/nap/nap",
        "exit code 11",
        "signalled flytesnacks/development/release/approve with true",
        "updated flytesnacks/development/release/main: attempt 1 SUCCEEDED",
    ] {
        assert!(
            stdout.contains(needle),
            "no {needle:?} in:\n{stdout}\nstderr:\n{stderr}"
        );
    }
    // `runs` shows the queue the root went to.
    let release = stdout
        .lines()
        .find(|l| l.starts_with("release "))
        .unwrap_or_else(|| panic!("no run `release` in:\n{stdout}"));
    assert!(release.contains(" manual "), "{release}");
    // The daemon's log, written to a file, is plain text.
    let log = std::fs::read(dir.path().join("actionsd.log")).unwrap();
    assert!(
        log.windows(7).any(|w| w == b"shut do"),
        "the log is complete"
    );
    assert!(
        !log.contains(&0x1b),
        "colour codes in actionsd.log:\n{}",
        String::from_utf8_lossy(&log)
    );
}

/// The shell blocks between `<!-- walkthrough:start -->` and
/// `<!-- walkthrough:end -->`.
fn walkthrough(readme: &str) -> String {
    let start = readme
        .find("<!-- walkthrough:start -->")
        .expect("README has a walkthrough start marker");
    let end = readme[start..]
        .find("<!-- walkthrough:end -->")
        .expect("README has a walkthrough end marker")
        + start;
    let mut script = String::new();
    let mut in_block = false;
    for line in readme[start..end].lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block && line.trim() == "```sh";
            continue;
        }
        if in_block {
            script.push_str(line);
            script.push('\n');
        }
    }
    script
}
