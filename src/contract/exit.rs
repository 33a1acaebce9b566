//! The wrapper's own exit codes.

/// An exit code of the worker wrapper itself, as opposed to the exit code of the test
/// command it passes on. Each says the environment failed (broker, command, config),
/// not the ticket in hand: the operator does not charge them to a ticket.
///
/// The codes follow `sysexits.h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum WorkerExit {
    /// 69: the broker could not be reached, refused the credentials, or the queue does
    /// not exist, before the worker took any ticket.
    BrokerUnavailable = 69,
    /// 71: the command could not be started (not found, not executable). It is checked
    /// before any ticket is taken; a ticket in hand when starting fails is given back to
    /// the queue.
    CommandNotStarted = 71,
    /// 75: the broker connection (or the consumer) was lost after the worker started
    /// consuming. The broker has already requeued any ticket in hand; the command, if one
    /// was running, was stopped.
    BrokerLost = 75,
    /// 78: invalid configuration (malformed URI, empty queue name, bad list of
    /// test-failure codes).
    Config = 78,
}

impl WorkerExit {
    /// The environment exit codes: a container that ends with one of them did not crash
    /// on its ticket. That is every code of the wrapper's own.
    pub const ENVIRONMENT: [WorkerExit; 4] = [
        WorkerExit::BrokerUnavailable,
        WorkerExit::CommandNotStarted,
        WorkerExit::BrokerLost,
        WorkerExit::Config,
    ];

    /// The process exit status.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The wrapper exit that `code` (a container's exit code) stands for, if any.
    pub fn from_code(code: i32) -> Option<Self> {
        Self::ENVIRONMENT
            .into_iter()
            .find(|e| i32::from(e.code()) == code)
    }

    /// True when a container that exited with `code` failed for its environment, not
    /// for the ticket it held.
    pub fn is_environment(code: i32) -> bool {
        Self::from_code(code).is_some()
    }
}

impl From<WorkerExit> for u8 {
    fn from(exit: WorkerExit) -> Self {
        exit.code()
    }
}

impl From<WorkerExit> for i32 {
    fn from(exit: WorkerExit) -> Self {
        exit.code().into()
    }
}

impl TryFrom<i32> for WorkerExit {
    type Error = i32;

    /// The wrapper exit of a container's exit code; the code itself when it is none.
    fn try_from(code: i32) -> Result<Self, i32> {
        Self::from_code(code).ok_or(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_conversions() {
        let codes: Vec<i32> = WorkerExit::ENVIRONMENT
            .iter()
            .map(|e| i32::from(*e))
            .collect();
        assert_eq!(codes, [69, 71, 75, 78]);
        for e in WorkerExit::ENVIRONMENT {
            assert_eq!(WorkerExit::try_from(i32::from(e)), Ok(e));
            assert_eq!(u8::from(e), e.code());
        }
        assert_eq!(WorkerExit::from_code(75), Some(WorkerExit::BrokerLost));
        assert_eq!(WorkerExit::try_from(2), Err(2));
        assert!(!WorkerExit::is_environment(0));
        assert!(!WorkerExit::is_environment(137));
        assert!(!WorkerExit::is_environment(69 + 256));
        assert!(WorkerExit::is_environment(78));
    }
}
