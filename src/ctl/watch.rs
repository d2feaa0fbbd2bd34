//! `actionsctl watch`: a run's actions as a live tree (on a terminal) or one
//! line per change (piped), from ReadService.WatchRun.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::time::{Duration, SystemTime};

use crate::client::AuthChannel as Channel;
use crossterm::style::{Color, Stylize};
use crossterm::{cursor, queue, terminal};

use super::cli::{Global, WatchArgs};
use super::error::{exit, Failure, Result};
use super::output::{self, Format};
use super::{run_id, run_path};
use crate::proto::actionsd::read::v1::read_service_client::ReadServiceClient;
use crate::proto::actionsd::read::v1::{watch_run_response, ActionSummary, WatchRunRequest};
use crate::proto::flyteidl2::common::ActionPhase;

/// How often the tree is redrawn while nothing changes (durations move).
const TICK: Duration = Duration::from_millis(500);
/// Deepest tree level drawn; deeper actions are drawn at this depth.
const MAX_DEPTH: usize = 64;

/// One action as the watch knows it.
#[derive(Debug, Clone)]
struct Node {
    summary: ActionSummary,
    /// When it started (start time, else creation; for an action first seen
    /// live, when it was seen: live changes carry no timestamps).
    started: SystemTime,
    /// When it became terminal, likewise.
    ended: Option<SystemTime>,
    /// Order of first sight, to keep siblings stable.
    seen: usize,
}

impl Node {
    fn name(&self) -> &str {
        self.summary.id.as_ref().map_or("", |id| id.name.as_str())
    }

    fn duration(&self, now: SystemTime) -> Duration {
        self.ended
            .unwrap_or(now)
            .duration_since(self.started)
            .unwrap_or_default()
    }
}

/// Every action of the run, by name.
#[derive(Debug, Default)]
struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    /// Applies a snapshot entry or a live change; returns the node's name.
    fn apply(&mut self, summary: ActionSummary, now: SystemTime) -> String {
        let name = summary
            .id
            .as_ref()
            .map(|id| id.name.clone())
            .unwrap_or_default();
        let seen = self.nodes.len();
        let terminal = output::is_terminal(summary.phase);
        let stamp_start = summary
            .start_time
            .as_ref()
            .or(summary.created_at.as_ref())
            .and_then(output::system_time);
        let stamp_end = if terminal {
            summary
                .end_time
                .as_ref()
                .or(summary.updated_at.as_ref())
                .and_then(output::system_time)
        } else {
            None
        };
        match self.nodes.get_mut(&name) {
            None => {
                self.nodes.insert(
                    name.clone(),
                    Node {
                        started: stamp_start.unwrap_or(now),
                        ended: if terminal {
                            stamp_end.or(Some(now))
                        } else {
                            None
                        },
                        summary,
                        seen,
                    },
                );
            }
            Some(node) => {
                if summary.version != 0 && summary.version < node.summary.version {
                    // Never backwards (the daemon guarantees it; be safe).
                    return name;
                }
                if let Some(start) = stamp_start {
                    node.started = start;
                }
                node.ended = match (terminal, stamp_end, node.ended) {
                    (false, _, _) => None,
                    (true, Some(end), _) => Some(end),
                    (true, None, Some(end)) => Some(end),
                    (true, None, None) => Some(now),
                };
                // Live changes leave what an event does not record unset:
                // keep what the snapshot said.
                let old = std::mem::take(&mut node.summary);
                let mut new = summary;
                if new.parent_name.is_empty() {
                    new.parent_name = old.parent_name;
                }
                if new.kind == 0 {
                    new.kind = old.kind;
                }
                for (slot, previous) in [
                    (&mut new.created_at, old.created_at),
                    (&mut new.updated_at, old.updated_at),
                    (&mut new.start_time, old.start_time),
                    (&mut new.end_time, old.end_time),
                    (&mut new.deadline, old.deadline),
                ] {
                    if slot.is_none() {
                        *slot = previous;
                    }
                }
                node.summary = new;
            }
        }
        name
    }

    /// The run's root: the action without a parent.
    fn root(&self) -> Option<&str> {
        self.nodes
            .values()
            .filter(|n| n.summary.parent_name.is_empty())
            .min_by_key(|n| n.seen)
            .map(Node::name)
    }

    /// Depth-first, children in order of creation (then of sight): each
    /// node with the tree prefix drawn before its name.
    fn ordered(&self) -> Vec<(String, &Node)> {
        let mut children: BTreeMap<&str, Vec<&Node>> = BTreeMap::new();
        let mut tops = Vec::new();
        for node in self.nodes.values() {
            let parent = node.summary.parent_name.as_str();
            if parent.is_empty() || !self.nodes.contains_key(parent) || parent == node.name() {
                tops.push(node);
            } else {
                children.entry(parent).or_default().push(node);
            }
        }
        let key = |n: &&Node| {
            (
                n.summary
                    .created_at
                    .as_ref()
                    .map(|t| (t.seconds, t.nanos))
                    .unwrap_or((i64::MAX, 0)),
                n.seen,
            )
        };
        tops.sort_by_key(key);
        for list in children.values_mut() {
            list.sort_by_key(key);
        }
        let mut out = Vec::new();
        let mut visited = HashSet::new();
        for top in tops {
            walk(top, "", None, &children, &mut visited, &mut out, 0);
        }
        // Anything not reached (a parent cycle) still shows, at the top.
        for node in self.nodes.values() {
            if !visited.contains(node.name()) {
                out.push((node.name().to_owned(), node));
            }
        }
        out
    }
}

fn walk<'a>(
    node: &'a Node,
    indent: &str,
    last: Option<bool>,
    children: &BTreeMap<&str, Vec<&'a Node>>,
    visited: &mut HashSet<&'a str>,
    out: &mut Vec<(String, &'a Node)>,
    depth: usize,
) {
    if !visited.insert(node.name()) {
        return;
    }
    let (branch, next_indent) = match last {
        None => (String::new(), String::new()),
        Some(true) => (format!("{indent}└─ "), format!("{indent}   ")),
        Some(false) => (format!("{indent}├─ "), format!("{indent}│  ")),
    };
    out.push((format!("{branch}{}", node.name()), node));
    let next_indent = if depth >= MAX_DEPTH {
        indent.to_owned()
    } else {
        next_indent
    };
    if let Some(list) = children.get(node.name()) {
        for (i, child) in list.iter().enumerate() {
            let is_last = i + 1 == list.len();
            walk(
                child,
                &next_indent,
                Some(is_last),
                children,
                visited,
                out,
                depth + 1,
            );
        }
    }
}

fn phase_color(phase: i32) -> Color {
    match ActionPhase::try_from(phase) {
        Ok(ActionPhase::Succeeded | ActionPhase::Recovered) => Color::Green,
        Ok(ActionPhase::Failed) => Color::Red,
        Ok(ActionPhase::Aborted | ActionPhase::TimedOut) => Color::Yellow,
        Ok(ActionPhase::Running) => Color::Cyan,
        Ok(ActionPhase::Paused) => Color::Magenta,
        Ok(ActionPhase::Initializing | ActionPhase::WaitingForResources) => Color::Blue,
        _ => Color::Grey,
    }
}

/// What is shown after the duration: an error, a signal value, or who runs
/// the action.
fn detail(summary: &ActionSummary) -> String {
    if let Some(error) = &summary.error {
        output::error_text(error)
    } else if let Some(value) = &summary.signal_value {
        format!("value {}", output::literal_text(value))
    } else if !summary.lease_holder.is_empty() && !output::is_terminal(summary.phase) {
        format!("on {}", summary.lease_holder)
    } else {
        String::new()
    }
}

/// A line of the tree: text segments, each maybe coloured.
type Line = Vec<(String, Option<Color>)>;

fn render(tree: &Tree, run: &str, now: SystemTime, live: bool) -> Vec<Line> {
    let rows = tree.ordered();
    let mut counts: BTreeMap<i32, usize> = BTreeMap::new();
    for node in tree.nodes.values() {
        *counts.entry(node.summary.phase).or_default() += 1;
    }
    let counts: Vec<String> = counts
        .iter()
        .map(|(phase, n)| format!("{n} {}", output::phase_name(*phase)))
        .collect();
    let mut lines = vec![vec![
        (format!("run {run}"), None),
        (
            format!(
                "  {} action{}: {}{}",
                tree.nodes.len(),
                if tree.nodes.len() == 1 { "" } else { "s" },
                counts.join(", "),
                if live { "" } else { "  (loading…)" }
            ),
            Some(Color::DarkGrey),
        ),
    ]];
    let width = rows
        .iter()
        .map(|(label, _)| label.chars().count())
        .max()
        .unwrap_or(0);
    let phase_width = rows
        .iter()
        .map(|(_, node)| output::phase_name(node.summary.phase).len())
        .max()
        .unwrap_or(0);
    for (label, node) in rows {
        let s = &node.summary;
        let pad = width - label.chars().count();
        let mut line: Line = vec![
            (format!("{label}{}  ", " ".repeat(pad)), None),
            (
                format!("{:<phase_width$}", output::phase_name(s.phase)),
                Some(phase_color(s.phase)),
            ),
            (format!("  #{:<3}", s.attempt), None),
            (format!("{:>8}", output::duration(node.duration(now))), None),
        ];
        let detail = detail(s);
        if !detail.is_empty() {
            line.push((format!("  {detail}"), Some(Color::DarkGrey)));
        }
        lines.push(line);
    }
    lines
}

/// Redraws the tree in place on a terminal.
struct Screen {
    /// Lines drawn last time (the cursor is below them).
    drawn: u16,
    color: bool,
}

impl Screen {
    fn draw(&mut self, lines: &[Line]) -> std::io::Result<()> {
        let (cols, rows) = terminal::size().unwrap_or((100, 40));
        let cols = usize::from(cols.max(10)) - 1;
        let max = usize::from(rows.max(3)) - 1;
        let mut out = std::io::stdout().lock();
        if self.drawn > 0 {
            queue!(out, cursor::MoveToPreviousLine(self.drawn))?;
        } else {
            queue!(out, cursor::MoveToColumn(0))?;
        }
        queue!(out, terminal::Clear(terminal::ClearType::FromCursorDown))?;
        let (shown, hidden) = if lines.len() > max {
            (&lines[..max - 1], lines.len() - (max - 1))
        } else {
            (lines, 0)
        };
        let mut count: u16 = 0;
        for line in shown {
            let mut room = cols;
            for (text, color) in line {
                if room == 0 {
                    break;
                }
                let text: String = text.chars().take(room).collect();
                room -= text.chars().count();
                match color {
                    Some(color) if self.color => {
                        queue!(out, crossterm::style::PrintStyledContent(text.with(*color)))?;
                    }
                    _ => queue!(out, crossterm::style::Print(text))?,
                }
            }
            queue!(out, crossterm::style::Print("\r\n"))?;
            count += 1;
        }
        if hidden > 0 {
            queue!(
                out,
                crossterm::style::Print(format!("… and {hidden} more lines\r\n"))
            )?;
            count += 1;
        }
        self.drawn = count;
        out.flush()
    }
}

/// Shows the cursor again however the watch ends.
struct CursorGuard;

impl Drop for CursorGuard {
    fn drop(&mut self) {
        let mut out = std::io::stdout();
        let _ = crossterm::execute!(out, cursor::Show);
    }
}

/// One line per change, for pipes and logs.
fn change_line(node: &Node, now: SystemTime) -> String {
    let s = &node.summary;
    let mut line = format!(
        "action={} parent={} phase={} attempt={}",
        node.name(),
        output::dash(&s.parent_name),
        output::phase_name(s.phase),
        s.attempt
    );
    if output::is_terminal(s.phase) {
        line.push_str(&format!(
            " duration={}",
            output::duration(node.duration(now))
        ));
    }
    if !s.output_uri.is_empty() && output::is_terminal(s.phase) {
        line.push_str(&format!(" output={}", s.output_uri));
    }
    if let Some(error) = &s.error {
        line.push_str(&format!(" error={:?}", output::error_text(error)));
    }
    if let Some(value) = &s.signal_value {
        line.push_str(&format!(" value={}", output::literal_text(value)));
    }
    line.push('\n');
    line
}

/// The exit code for how the watched action ended.
fn exit_for_phase(phase: i32) -> u8 {
    match ActionPhase::try_from(phase) {
        Ok(ActionPhase::Failed) => exit::FAILED,
        Ok(ActionPhase::Aborted) => exit::ABORTED,
        Ok(ActionPhase::TimedOut) => exit::TIMED_OUT,
        _ => exit::OK,
    }
}

enum Mode {
    /// Redrawn in place.
    Tty(Screen),
    /// One line per change.
    Lines,
    /// Each message as JSON or YAML.
    Documents(Format),
}

pub async fn run(
    global: &Global,
    mut client: ReadServiceClient<Channel>,
    args: WatchArgs,
    tty: bool,
) -> Result<u8> {
    let run = run_id(global, &args.run);
    let title = run_path(Some(&run));
    let open = client.watch_run(WatchRunRequest { run: Some(run) });
    let mut stream = tokio::time::timeout(global.timeout, open)
        .await
        .map_err(|_| {
            Failure::unavailable(format!(
                "the daemon did not open the watch within {}",
                output::duration(global.timeout)
            ))
        })??
        .into_inner();

    let mut mode = match global.output {
        Format::Table if tty => Mode::Tty(Screen {
            drawn: 0,
            color: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        }),
        Format::Table => Mode::Lines,
        format => Mode::Documents(format),
    };
    let _cursor = match mode {
        Mode::Tty(_) => {
            let _ = crossterm::execute!(std::io::stdout(), cursor::Hide);
            Some(CursorGuard)
        }
        _ => None,
    };
    let mut tree = Tree::default();
    let mut live = false;
    let mut target: Option<String> = None;
    // Output of the snapshot, held until the sentinel.
    let mut pending = String::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    let draw = |mode: &mut Mode, tree: &Tree, live: bool| -> Result<()> {
        if let Mode::Tty(screen) = mode {
            screen
                .draw(&render(tree, &title, SystemTime::now(), live))
                .map_err(|e| Failure::other(format!("cannot write to the terminal: {e}")))?;
        }
        Ok(())
    };

    // Ends at the watched action's end (--exit-on-terminal), at Ctrl-C, or
    // when the stream ends; the daemon never ends a stream with OK while it
    // runs.
    loop {
        tokio::select! {
            message = stream.message() => {
                let message = match message {
                    Ok(Some(message)) => message,
                    Ok(None) => return Err(Failure::unavailable("the daemon ended the watch")),
                    Err(status) => {
                        draw(&mut mode, &tree, live)?;
                        return Err(status.into());
                    }
                };
                if let Mode::Documents(format) = mode {
                    let value = output::to_json("actionsd.read.v1.WatchRunResponse", &message)?;
                    let text = match format {
                        Format::Yaml => format!("---\n{}", output::render_document(format, &value)?),
                        _ => format!("{value}\n"),
                    };
                    pending.push_str(&text);
                }
                match message.message {
                    Some(watch_run_response::Message::Action(summary)) => {
                        let now = SystemTime::now();
                        let name = tree.apply(summary, now);
                        if let (Mode::Lines, Some(node)) = (&mode, tree.nodes.get(&name)) {
                            pending.push_str(&change_line(node, now));
                        }
                        if live {
                            draw(&mut mode, &tree, live)?;
                        }
                    }
                    Some(watch_run_response::Message::Sentinel(_)) => {
                        live = true;
                        if args.exit_on_terminal {
                            let name = match &args.action {
                                Some(name) => name.clone(),
                                None => tree.root().map(str::to_owned).ok_or_else(|| {
                                    Failure::not_found(format!("run {title} has no actions"))
                                })?,
                            };
                            if !tree.nodes.contains_key(&name) {
                                return Err(Failure::not_found(format!(
                                    "action {title}/{name} not found"
                                )));
                            }
                            target = Some(name);
                        }
                        draw(&mut mode, &tree, live)?;
                    }
                    None => {}
                }
                // The snapshot is printed once it is complete (and the
                // watched action known to exist); live changes at once.
                if live && !pending.is_empty() {
                    output::write_out(&std::mem::take(&mut pending))?;
                }
                if let Some(node) = target.as_ref().and_then(|t| tree.nodes.get(t)) {
                    if output::is_terminal(node.summary.phase) {
                        draw(&mut mode, &tree, live)?;
                        return Ok(exit_for_phase(node.summary.phase));
                    }
                }
            }
            _ = ticker.tick(), if live && matches!(mode, Mode::Tty(_)) => {
                draw(&mut mode, &tree, live)?;
            }
            _ = &mut ctrl_c => {
                return Ok(exit::OK);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::flyteidl2::common::{ActionIdentifier, RunIdentifier};

    fn summary(name: &str, parent: &str, phase: ActionPhase, version: u64) -> ActionSummary {
        ActionSummary {
            id: Some(ActionIdentifier {
                run: Some(RunIdentifier::default()),
                name: name.into(),
            }),
            parent_name: parent.into(),
            phase: phase as i32,
            attempt: 1,
            version,
            ..Default::default()
        }
    }

    #[test]
    fn the_tree_nests_children_and_keeps_older_state_out() {
        let mut tree = Tree::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        tree.apply(summary("a0", "", ActionPhase::Running, 3), t0);
        tree.apply(summary("b", "a0", ActionPhase::Queued, 1), t0);
        tree.apply(summary("c", "b", ActionPhase::Queued, 1), t0);
        tree.apply(summary("d", "a0", ActionPhase::Queued, 1), t0);
        let labels: Vec<String> = tree.ordered().into_iter().map(|(l, _)| l).collect();
        assert_eq!(labels, ["a0", "├─ b", "│  └─ c", "└─ d"]);
        assert_eq!(tree.root(), Some("a0"));

        // A live change without a parent keeps the known parent; an older
        // version is ignored; becoming terminal stamps the end.
        let t1 = t0 + Duration::from_secs(5);
        tree.apply(summary("b", "", ActionPhase::Succeeded, 3), t1);
        tree.apply(summary("b", "", ActionPhase::Running, 2), t1);
        let b = &tree.nodes["b"];
        assert_eq!(b.summary.parent_name, "a0");
        assert_eq!(b.summary.phase, ActionPhase::Succeeded as i32);
        assert_eq!(
            b.duration(t1 + Duration::from_secs(60)),
            Duration::from_secs(5)
        );
        assert_eq!(
            exit_for_phase(ActionPhase::TimedOut as i32),
            exit::TIMED_OUT
        );
    }
}
