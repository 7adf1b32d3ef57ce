//! One error type for the whole sidecar: a message that says what was being done, with which
//! input, and the chain of causes underneath it.

use std::error::Error as StdError;
use std::fmt;

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub struct Error {
    context: String,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl Error {
    pub fn msg(context: impl Into<String>) -> Self {
        Error {
            context: context.into(),
            source: None,
        }
    }

    pub fn with_source(
        context: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync + 'static>>,
    ) -> Self {
        Error {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// Wraps this error in one more layer of context.
    pub fn context(self, context: impl Into<String>) -> Self {
        Error::with_source(context, self)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The whole chain on one line: operators read these in logs, where a cause on another
        // line is a cause lost.
        write!(f, "{}", self.context)?;
        let mut next = self
            .source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static));
        while let Some(cause) = next {
            write!(f, ": {cause}")?;
            next = cause.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        // Display already walks the chain; exposing it here too would print causes twice.
        None
    }
}

/// `anyhow`-style context on any `Result` whose error can be boxed.
pub trait Context<T> {
    fn context(self, context: impl Into<String>) -> Result<T>;
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T, E> Context<T> for std::result::Result<T, E>
where
    E: Into<Box<dyn StdError + Send + Sync + 'static>>,
{
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::with_source(context, e))
    }

    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| Error::with_source(f(), e))
    }
}

/// Exit code for bad usage or configuration (sysexits' EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// Why a run ended early: the exit code and the error to log.
#[derive(Debug)]
pub struct Fatal {
    pub code: i32,
    pub error: Error,
}

impl From<Error> for Fatal {
    fn from(error: Error) -> Self {
        Fatal { code: 1, error }
    }
}

/// A configuration or usage error: exit code 64.
pub fn usage(error: Error) -> Fatal {
    Fatal {
        code: EXIT_USAGE,
        error,
    }
}

impl From<crate::value::Refused> for Error {
    fn from(r: crate::value::Refused) -> Self {
        Error::msg(r.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_walks_the_whole_chain_on_one_line() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err: Result<()> = Err(io).context("reading /x/leaf.pem");
        let err = err
            .map_err(|e| e.context("writing certificates"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "writing certificates: reading /x/leaf.pem: no such file"
        );
    }
}
