//! actionsctl's command line (clap derive).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use humantime_serde::re::humantime;

use super::error::EXIT_CODES_HELP;
use super::output::Format;
use crate::proto::flyteidl2::common::ActionPhase;

const ABOUT: &str = "Look at and steer actionsd from a terminal";

const LONG_ABOUT: &str = "\
Look at and steer actionsd from a terminal.

actionsctl talks to one actionsd daemon (--server, or ACTIONSD_SERVER) over
gRPC: it enqueues, updates, aborts and signals actions through Flyte's
ActionsService, and reads runs, actions and their history through actionsd's
ReadService. An action is named by its run and its own name; the project and
domain (and org) come from --project/--domain/--org or ACTIONSD_PROJECT,
ACTIONSD_DOMAIN, ACTIONSD_ORG, which the reference executor sets for the
commands it runs, so a task can enqueue children of itself without flags.

Examples:
  actionsctl health --wait 10s                    # is the daemon up?
  actionsctl enqueue r1 main                      # a root task action
  actionsctl enqueue r1 fetch --parent main       # a child of it
  actionsctl enqueue -f request.yaml              # an EnqueueRequest in proto3 JSON/YAML
  actionsctl watch r1 --exit-on-terminal          # live tree; exit code says how it ended
  actionsctl ls --run r1 --phase running          # actions of a run, filtered
  actionsctl get r1 fetch -o yaml                 # one action, with its spec
  actionsctl history r1 fetch                     # every change of an action
  actionsctl runs                                 # runs of the project, newest first
  actionsctl abort r1 main --reason 'not needed'  # abort an action and its descendants
  actionsctl signal r1 approve true               # resolve a condition
  actionsctl update r1 main --attempt 1 --phase succeeded";

#[derive(Parser, Debug)]
#[command(
    name = "actionsctl",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = "Run `actionsctl help <command>` for a command's flags and examples; \
                  `actionsctl --help` for the exit codes.",
    after_long_help = EXIT_CODES_HELP,
    propagate_version = true,
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// The daemon's address.
    #[arg(
        long,
        global = true,
        env = "ACTIONSD_SERVER",
        default_value = "http://127.0.0.1:8091"
    )]
    pub server: String,
    /// Organization of the actions and runs named (may be empty).
    #[arg(long, global = true, env = "ACTIONSD_ORG", default_value = "")]
    pub org: String,
    /// Project of the actions and runs named.
    #[arg(
        long,
        global = true,
        env = "ACTIONSD_PROJECT",
        default_value = "flytesnacks"
    )]
    pub project: String,
    /// Domain of the actions and runs named.
    #[arg(
        long,
        global = true,
        env = "ACTIONSD_DOMAIN",
        default_value = "development"
    )]
    pub domain: String,
    /// How results are printed: a table for people, or the proto3 JSON
    /// mapping of the response (or YAML of it) for scripts.
    #[arg(
        short,
        long,
        global = true,
        value_enum,
        env = "ACTIONSD_OUTPUT",
        default_value = "table"
    )]
    pub output: Format,
    /// Bound on each call to the daemon (not on `watch`), including
    /// connecting.
    #[arg(
        long,
        global = true,
        default_value = "10s",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    pub timeout: Duration,
    /// Bearer token sent with every call (`authorization: Bearer …`).
    #[arg(
        long,
        global = true,
        env = "ACTIONSD_TOKEN",
        hide_env_values = true,
        value_parser = crate::client::parse_token
    )]
    pub token: Option<secrecy::SecretString>,
    /// PEM CA certificate the daemon's certificate must chain to (with an
    /// https:// --server) [default: the system's roots].
    #[arg(long, global = true, env = "ACTIONSD_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate, for a daemon that verifies clients (mTLS).
    #[arg(
        long,
        global = true,
        env = "ACTIONSD_CLIENT_CERT",
        value_name = "FILE",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(
        long,
        global = true,
        env = "ACTIONSD_CLIENT_KEY",
        value_name = "FILE",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
}

impl Global {
    /// The connection settings these flags give.
    pub fn security(&self) -> crate::client::ClientSecurity {
        crate::client::ClientSecurity {
            token: self.token.clone(),
            ca_cert: self.ca_cert.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
        }
    }
}

/// A run, by name.
#[derive(Args, Debug, Clone)]
pub struct RunRef {
    /// The run's name.
    pub run: String,
}

/// An action, by run and name.
#[derive(Args, Debug, Clone)]
pub struct ActionRef {
    /// The run's name.
    pub run: String,
    /// The action's name.
    pub action: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Enqueue an action: from flags, or from a file holding an
    /// EnqueueRequest.
    #[command(long_about = ENQUEUE_ABOUT)]
    Enqueue(EnqueueArgs),
    /// Show one action: its state and the spec it was enqueued with.
    #[command(
        long_about = "Show one action: its state and the spec it was enqueued with.

Examples:
  actionsctl get r1 main
  actionsctl get r1 main -o json | jq -r .action.phase"
    )]
    Get(ActionRef),
    /// List actions, oldest first, filtered by run, parent, phase and queue.
    #[command(
        visible_alias = "list",
        long_about = "List actions, oldest first, filtered by run, parent, phase and queue.

Results come a page at a time (--limit, at most 1000); the table ends with
the command for the next page, and --all follows every page.

Examples:
  actionsctl ls --run r1
  actionsctl ls --run r1 --parent main --phase failed --phase timed-out
  actionsctl ls --queue gpu --phase queued --all -o json"
    )]
    Ls(LsArgs),
    /// List runs, newest first, with how many actions are in each phase.
    #[command(
        long_about = "List runs of --org/--project/--domain, newest first, with how many of
their actions are in each phase.

Examples:
  actionsctl runs
  actionsctl runs --project other --limit 5"
    )]
    Runs(RunsArgs),
    /// Show every accepted change of an action, oldest first.
    #[command(
        long_about = "Show every accepted change of an action, oldest first: the phase,
attempt, lease holder, output and error each change produced.

Example:
  actionsctl history r1 fetch"
    )]
    History(ActionRef),
    /// Delete a finished run with its actions and history.
    #[command(
        long_about = "Delete a finished run (every action terminal) with its actions and
history, as retention does once retention.period has passed. A run still
going gets FAILED_PRECONDITION (exit code 5): abort it first.

Example:
  actionsctl delete-run r1"
    )]
    DeleteRun(RunRef),
    /// Watch a run live: a tree of its actions with phase, attempt and
    /// duration.
    #[command(long_about = WATCH_ABOUT)]
    Watch(WatchArgs),
    /// Abort an action and every unfinished descendant.
    #[command(
        long_about = "Abort an action and every unfinished descendant, in one transaction.
Executors running them are told at once. An action that already ended gets
FAILED_PRECONDITION (exit code 5).

Example:
  actionsctl abort r1 main --reason 'wrong inputs'"
    )]
    Abort(AbortArgs),
    /// Resolve a condition action with a value.
    #[command(long_about = SIGNAL_ABOUT)]
    Signal(SignalArgs),
    /// Report an action's status, as an executor would.
    #[command(
        long_about = "Report an action's status, as an executor would: its attempt and phase.
Phases only move forward within an attempt (QUEUED, WAITING_FOR_RESOURCES,
INITIALIZING, RUNNING, then a terminal phase); a higher attempt starts a new
one. Useful to finish actions by hand, e.g. a root on a queue no executor
serves.

Example:
  actionsctl update r1 main --attempt 1 --phase running
  actionsctl update r1 main --attempt 1 --phase succeeded"
    )]
    Update(UpdateArgs),
    /// Check that the daemon is up and serving (gRPC health).
    #[command(
        long_about = "Check that the daemon is up and serving: the gRPC health service
answers SERVING (it answers NOT_SERVING while the database is unreachable).
With --wait, retry until it does or the time is up (exit code 6).

Example:
  actionsd serve &
  actionsctl health --wait 10s"
    )]
    Health(HealthArgs),
    /// Print a shell completion script.
    #[command(long_about = "Print a completion script for a shell.

Examples:
  actionsctl completions bash > ~/.local/share/bash-completion/completions/actionsctl
  actionsctl completions zsh > \"${fpath[1]}/_actionsctl\"
  actionsctl completions fish > ~/.config/fish/completions/actionsctl.fish")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    #[command(long_about = "Print actionsctl's man page (roff) on stdout.

Example:
  actionsctl man > actionsctl.1 && man ./actionsctl.1")]
    Man,
}

const ENQUEUE_ABOUT: &str = "\
Enqueue an action, from flags or from a file.

From flags: a task action (the default) or, with --condition, a condition
that waits for `actionsctl signal`. A root action (no --parent) starts the
run; its --run-queue and --max-concurrency become the run's RunSpec. URIs
default to file:///tmp/actionsd/<project>/<domain>/<run> (--output-base) and
<output-base>/<action>/inputs.pb (--input-uri); the reference executor passes
them to the command it runs.

From a file (-f, `-` for stdin): a flyteidl2.actions.EnqueueRequest in the
proto3 JSON mapping, as JSON or YAML. TaskSpec, RunSpec and the other
payloads are written as objects, as Flyte's JSON clients send them. Print a
starting point with --dry-run.

Enqueue is idempotent: the same action again is OK; the same name with other
content is ALREADY_EXISTS (exit code 5).

Examples:
  actionsctl enqueue r1 main --queue default
  actionsctl enqueue r1 train --parent main --task train --input-uri s3://b/in.pb
  actionsctl enqueue r1 approve --parent main --condition --type bool --prompt 'Ship it?'
  actionsctl enqueue r1 main --dry-run -o yaml > request.yaml
  actionsctl enqueue -f request.yaml";

const WATCH_ABOUT: &str = "\
Watch a run live: every action of the run as a tree, with its phase,
attempt and duration. On a terminal the tree is redrawn in place, in colour
(NO_COLOR turns colour off); piped, one line per change. With -o json or
-o yaml, each WatchRun message is printed as it arrives (one JSON object a
line, or YAML documents).

--exit-on-terminal (alias --until-done) ends the watch when the watched
action (--action, default the run's root) is terminal, with an exit code that
says how it ended: 0 SUCCEEDED, 10 FAILED, 11 ABORTED, 12 TIMED_OUT.
Without it, watch runs until interrupted (Ctrl-C, exit code 0).

Examples:
  actionsctl watch r1
  actionsctl watch r1 --exit-on-terminal && echo 'run succeeded'
  actionsctl watch r1 --action train --exit-on-terminal | tee train.log";

const SIGNAL_ABOUT: &str = "\
Resolve a condition action with a value. The value is typed: --type says how
VALUE is read (bool, int, float, string); without --type, actionsctl reads
the type the condition declared. The condition's parent is looked up too,
unless --parent is given.

Signalling the same value again is OK; another value after the condition was
resolved is FAILED_PRECONDITION (exit code 5); a value of the wrong type is
INVALID_ARGUMENT (exit code 3).

Examples:
  actionsctl signal r1 approve true
  actionsctl signal r1 batch-size 64 --type int --parent main";

#[derive(Args, Debug)]
pub struct EnqueueArgs {
    /// The run's name (with flags; not with --file).
    #[arg(required_unless_present = "file")]
    pub run: Option<String>,
    /// The action's name (with flags; not with --file).
    #[arg(required_unless_present = "file")]
    pub action: Option<String>,
    /// An EnqueueRequest in the proto3 JSON mapping, JSON or YAML (`-`:
    /// stdin).
    #[arg(short, long, value_name = "PATH", conflicts_with_all = [
        "run", "action", "parent", "condition", "task", "task_version", "queue",
        "input_uri", "output_base", "run_queue", "max_concurrency",
    ])]
    pub file: Option<PathBuf>,
    /// The parent action; none for the run's root.
    #[arg(long)]
    pub parent: Option<String>,
    /// Enqueue a condition (waits for a signal) instead of a task.
    #[arg(long)]
    pub condition: bool,
    /// The task's name in its TaskIdentifier [default: the action's name].
    #[arg(long, conflicts_with = "condition")]
    pub task: Option<String>,
    /// The task's version.
    #[arg(long, default_value = "v1", conflicts_with = "condition")]
    pub task_version: String,
    /// The queue executors lease this task from [default: the run's queue,
    /// else "default"].
    #[arg(long, conflicts_with = "condition")]
    pub queue: Option<String>,
    /// Where the action's inputs are [default:
    /// <output-base>/<action>/inputs.pb].
    #[arg(long, value_name = "URI")]
    pub input_uri: Option<String>,
    /// The run's output base [default:
    /// file:///tmp/actionsd/<project>/<domain>/<run>].
    #[arg(long, value_name = "URI")]
    pub output_base: Option<String>,
    /// Root only: the run's queue (RunSpec.queue), inherited by its tasks.
    #[arg(long, conflicts_with = "parent")]
    pub run_queue: Option<String>,
    /// Root only: at most this many actions of the run leased at once.
    #[arg(long, conflicts_with = "parent", value_name = "N")]
    pub max_concurrency: Option<u32>,
    /// Condition: the type of value it waits for.
    #[arg(
        long = "type",
        value_enum,
        default_value = "bool",
        requires = "condition"
    )]
    pub value_type: ValueType,
    /// Condition: the question shown to whoever signals it.
    #[arg(long, requires = "condition")]
    pub prompt: Option<String>,
    /// Condition: a description.
    #[arg(long, requires = "condition")]
    pub description: Option<String>,
    /// Condition: TIMED_OUT when not signalled within this time (e.g. 10m).
    #[arg(long, requires = "condition", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub condition_timeout: Option<Duration>,
    /// Print the request instead of sending it (as JSON or YAML with -o).
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct Paging {
    /// At most this many per page (the daemon caps it at 1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
    /// Continue from a previous page (same filters).
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
    /// Follow every page (at most 1000 pages).
    #[arg(long, conflicts_with = "page_token")]
    pub all: bool,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Only actions of this run.
    #[arg(long)]
    pub run: Option<String>,
    /// Only direct children of this action (needs --run).
    #[arg(long, requires = "run")]
    pub parent: Option<String>,
    /// Only actions in this phase (repeat for several).
    #[arg(long, value_enum, ignore_case = true)]
    pub phase: Vec<PhaseArg>,
    /// Only task actions of this queue.
    #[arg(long)]
    pub queue: Option<String>,
    #[command(flatten)]
    pub paging: Paging,
}

#[derive(Args, Debug)]
pub struct RunsArgs {
    #[command(flatten)]
    pub paging: Paging,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// The run's name.
    pub run: String,
    /// The action --exit-on-terminal waits for [default: the run's root].
    #[arg(long)]
    pub action: Option<String>,
    /// Exit when the watched action is terminal; the exit code says how it
    /// ended (0 SUCCEEDED, 10 FAILED, 11 ABORTED, 12 TIMED_OUT).
    #[arg(long, visible_alias = "until-done")]
    pub exit_on_terminal: bool,
}

#[derive(Args, Debug)]
pub struct AbortArgs {
    #[command(flatten)]
    pub target: ActionRef,
    /// Why; shown to watchers in the action's error.
    #[arg(long, default_value = "aborted with actionsctl")]
    pub reason: String,
    /// Who aborts (recorded as the aborting user's subject).
    #[arg(long, env = "USER", value_name = "SUBJECT")]
    pub by: Option<String>,
}

#[derive(Args, Debug)]
pub struct SignalArgs {
    #[command(flatten)]
    pub target: ActionRef,
    /// The value: true/false, an integer, a number or a string, per --type.
    #[arg(allow_hyphen_values = true)]
    pub value: String,
    /// How VALUE is read [default: the type the condition declared].
    #[arg(long = "type", value_enum)]
    pub value_type: Option<ValueType>,
    /// The condition's parent [default: looked up].
    #[arg(long)]
    pub parent: Option<String>,
    /// Who signals (recorded as the signalling user's subject).
    #[arg(long, env = "USER", value_name = "SUBJECT")]
    pub by: Option<String>,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    #[command(flatten)]
    pub target: ActionRef,
    /// The attempt the status is for (starts at 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub attempt: u32,
    /// The new phase.
    #[arg(long, value_enum, ignore_case = true)]
    pub phase: PhaseArg,
}

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// Retry until the daemon serves, for at most this long (e.g. 10s).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub wait: Option<Duration>,
}

/// A phase on the command line: `running`, `timed-out`; case does not
/// matter and `_` works like `-`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "kebab-case")]
pub enum PhaseArg {
    Queued,
    #[value(alias = "waiting_for_resources")]
    WaitingForResources,
    Initializing,
    Running,
    Succeeded,
    Failed,
    Aborted,
    #[value(alias = "timed_out")]
    TimedOut,
    Paused,
    Recovered,
}

impl PhaseArg {
    pub fn to_wire(self) -> i32 {
        let phase = match self {
            Self::Queued => ActionPhase::Queued,
            Self::WaitingForResources => ActionPhase::WaitingForResources,
            Self::Initializing => ActionPhase::Initializing,
            Self::Running => ActionPhase::Running,
            Self::Succeeded => ActionPhase::Succeeded,
            Self::Failed => ActionPhase::Failed,
            Self::Aborted => ActionPhase::Aborted,
            Self::TimedOut => ActionPhase::TimedOut,
            Self::Paused => ActionPhase::Paused,
            Self::Recovered => ActionPhase::Recovered,
        };
        phase as i32
    }
}

/// The primitive types a condition can wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ValueType {
    #[value(alias = "boolean")]
    Bool,
    #[value(alias = "integer")]
    Int,
    Float,
    #[value(alias = "str")]
    String,
}

/// The command tree, for completions and the man page.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn phases_parse_in_either_spelling() {
        for spelling in ["timed-out", "TIMED_OUT", "Timed-Out"] {
            let cli =
                Cli::try_parse_from(["actionsctl", "ls", "--phase", spelling]).expect(spelling);
            let Command::Ls(ls) = cli.command else {
                panic!("ls")
            };
            assert_eq!(ls.phase, vec![PhaseArg::TimedOut]);
        }
    }
}
