use std::fmt;

/// The phase of an action, numbered as `flyteidl2.common.ActionPhase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i16)]
pub enum Phase {
    Queued = 1,
    WaitingForResources = 2,
    Initializing = 3,
    Running = 4,
    Succeeded = 5,
    Failed = 6,
    Aborted = 7,
    TimedOut = 8,
    Paused = 9,
    Recovered = 10,
}

impl Phase {
    /// The phase for a wire value; `None` for UNSPECIFIED (0) and unknown values.
    pub fn from_wire(value: i32) -> Option<Self> {
        Some(match value {
            1 => Self::Queued,
            2 => Self::WaitingForResources,
            3 => Self::Initializing,
            4 => Self::Running,
            5 => Self::Succeeded,
            6 => Self::Failed,
            7 => Self::Aborted,
            8 => Self::TimedOut,
            9 => Self::Paused,
            10 => Self::Recovered,
            _ => return None,
        })
    }

    pub fn to_wire(self) -> i32 {
        self as i32
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Aborted | Self::TimedOut | Self::Recovered
        )
    }

    /// Position in the forward order QUEUED → WAITING_FOR_RESOURCES →
    /// INITIALIZING → RUNNING → terminal. PAUSED ranks with RUNNING: a
    /// running action may pause and resume.
    pub fn rank(self) -> u8 {
        match self {
            Self::Queued => 1,
            Self::WaitingForResources => 2,
            Self::Initializing => 3,
            Self::Running | Self::Paused => 4,
            Self::Succeeded | Self::Failed | Self::Aborted | Self::TimedOut | Self::Recovered => 5,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::WaitingForResources => "WAITING_FOR_RESOURCES",
            Self::Initializing => "INITIALIZING",
            Self::Running => "RUNNING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Aborted => "ABORTED",
            Self::TimedOut => "TIMED_OUT",
            Self::Paused => "PAUSED",
            Self::Recovered => "RECOVERED",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_round_trip() {
        for v in 1..=10 {
            assert_eq!(Phase::from_wire(v).unwrap().to_wire(), v);
        }
        assert_eq!(Phase::from_wire(0), None);
        assert_eq!(Phase::from_wire(11), None);
    }

    #[test]
    fn terminal_phases_match_the_wire_contract() {
        let terminal: Vec<i32> = (1..=10)
            .filter(|v| Phase::from_wire(*v).unwrap().is_terminal())
            .collect();
        assert_eq!(terminal, vec![5, 6, 7, 8, 10]);
    }
}
