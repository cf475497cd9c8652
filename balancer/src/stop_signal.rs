//! `--stop-signal`: the signal that asks a worker to finish and exit. Servers have their own
//! graceful-stop signal (nginx QUIT, lighttpd INT, gunicorn TERM), as systemd's `KillSignal=`
//! and Docker's `STOPSIGNAL` let one name it.
use std::str::FromStr;

use nix::sys::signal::Signal;

/// A signal as the operator named it: `TERM`, `SIGTERM`, `sigquit` or a number such as `3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopSignal(pub Signal);

impl Default for StopSignal {
    fn default() -> Self {
        Self(Signal::SIGTERM)
    }
}

impl std::fmt::Display for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_str())
    }
}

/// A name or number that is no signal a worker can be sent.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum StopSignalError {
    /// No signal has this name.
    #[error("{0:?} is not a signal name: give one such as TERM, QUIT, INT, HUP, USR1, USR2, WINCH (with or without SIG) or its number")]
    UnknownName(String),
    /// No signal has this number.
    #[error("{0} is not a signal number: give one from 1 to 31 (kill -l lists them) or a name such as TERM")]
    UnknownNumber(String),
    /// Signal 0 only checks that a process exists; it would never stop one.
    #[error(
        "signal 0 stops nothing (it only checks a process exists): give a signal such as TERM"
    )]
    Zero,
    /// A signal that freezes a process (STOP, TSTP, TTIN, TTOU) or that no server takes as a
    /// request to stop (CONT, CHLD, URG: ignored by default): every stop would wait out the
    /// grace, with the old worker holding its connections.
    #[error("{0} does not ask a process to finish and exit (it freezes it, or is ignored by default): give the server's graceful-stop signal, such as TERM, QUIT, INT or WINCH")]
    CannotStop(&'static str),
}

impl FromStr for StopSignal {
    type Err = StopSignalError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let signal = Self::any(s)?;
        match signal.0 {
            Signal::SIGSTOP
            | Signal::SIGTSTP
            | Signal::SIGTTIN
            | Signal::SIGTTOU
            | Signal::SIGCONT
            | Signal::SIGCHLD
            | Signal::SIGURG => Err(StopSignalError::CannotStop(signal.0.as_str())),
            _ => Ok(signal),
        }
    }
}

impl StopSignal {
    /// Any signal, by name or number.
    fn any(s: &str) -> Result<Self, StopSignalError> {
        let s = s.trim();
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            let n: i32 = s
                .parse()
                .map_err(|_| StopSignalError::UnknownNumber(s.to_owned()))?;
            if n == 0 {
                return Err(StopSignalError::Zero);
            }
            return Signal::try_from(n)
                .map(Self)
                .map_err(|_| StopSignalError::UnknownNumber(s.to_owned()));
        }
        let upper = s.to_ascii_uppercase();
        let name = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        Signal::from_str(&name)
            .map(Self)
            .map_err(|_| StopSignalError::UnknownName(s.to_owned()))
    }
}

/// For clap's `value_parser`.
pub fn parse(s: &str) -> Result<StopSignal, String> {
    s.parse().map_err(|e: StopSignalError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_taken_with_or_without_sig_in_any_case() {
        for (text, signal) in [
            ("TERM", Signal::SIGTERM),
            ("SIGTERM", Signal::SIGTERM),
            ("quit", Signal::SIGQUIT),
            ("SigInt", Signal::SIGINT),
            ("HUP", Signal::SIGHUP),
            ("usr1", Signal::SIGUSR1),
            ("USR2", Signal::SIGUSR2),
            ("winch", Signal::SIGWINCH),
            ("KILL", Signal::SIGKILL),
        ] {
            assert_eq!(text.parse::<StopSignal>(), Ok(StopSignal(signal)), "{text}");
        }
    }

    #[test]
    fn numbers_are_taken() {
        assert_eq!("3".parse(), Ok(StopSignal(Signal::SIGQUIT)));
        assert_eq!("15".parse(), Ok(StopSignal(Signal::SIGTERM)));
        assert_eq!("2".parse(), Ok(StopSignal(Signal::SIGINT)));
    }

    #[test]
    fn unknown_signals_are_errors_that_say_what_to_give() {
        for (text, want) in [
            ("NOPE", StopSignalError::UnknownName("NOPE".into())),
            ("", StopSignalError::UnknownName(String::new())),
            ("SIG", StopSignalError::UnknownName("SIG".into())),
            ("-1", StopSignalError::UnknownName("-1".into())),
            ("99", StopSignalError::UnknownNumber("99".into())),
            (
                "99999999999999999999",
                StopSignalError::UnknownNumber("99999999999999999999".into()),
            ),
            ("0", StopSignalError::Zero),
            ("STOP", StopSignalError::CannotStop("SIGSTOP")),
            ("19", StopSignalError::CannotStop("SIGSTOP")),
            ("sigtstp", StopSignalError::CannotStop("SIGTSTP")),
            ("CONT", StopSignalError::CannotStop("SIGCONT")),
            ("CHLD", StopSignalError::CannotStop("SIGCHLD")),
        ] {
            assert_eq!(text.parse::<StopSignal>(), Err(want), "{text:?}");
        }
        assert!(parse("NOPE").unwrap_err().contains("such as TERM"));
    }

    #[test]
    fn the_default_is_term() {
        assert_eq!(StopSignal::default().to_string(), "SIGTERM");
    }
}
