use std::fmt;

/// A run: (org, project, domain, name). `org` may be empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId {
    pub org: String,
    pub project: String,
    pub domain: String,
    pub name: String,
}

/// An action: a run plus the action's name within it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActionId {
    pub run: RunId,
    pub name: String,
}

impl ActionId {
    pub fn new(run: RunId, name: impl Into<String>) -> Self {
        Self {
            run,
            name: name.into(),
        }
    }

    /// The id of another action in the same run.
    pub fn sibling(&self, name: impl Into<String>) -> Self {
        Self::new(self.run.clone(), name)
    }
}

#[cfg(test)]
impl ActionId {
    /// An action of the run `p/d/r`, for unit tests.
    pub(crate) fn in_test_run(name: &str) -> Self {
        Self::new(
            RunId {
                org: String::new(),
                project: "p".into(),
                domain: "d".into(),
                name: "r".into(),
            },
            name,
        )
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.org.is_empty() {
            write!(f, "{}/", self.org)?;
        }
        write!(f, "{}/{}/{}", self.project, self.domain, self.name)
    }
}

impl fmt::Display for ActionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.run, self.name)
    }
}

/// What a WatchForUpdates stream follows: one action of a run and its
/// direct children.
pub type WatchKey = ActionId;

/// The org name that stands for the empty org wherever a client names a
/// run. flyte 2.12.1's task runtime refuses an empty org, so the Flyte
/// executor hands it this name for runs enqueued without one; actionsd
/// reads it back as the empty org, so the task's children land in its run.
pub const EMPTY_ORG_ALIAS: &str = "-";
