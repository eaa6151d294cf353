//! One error type for the whole engine. Every message names what failed and the values involved, so a user can act
//! on it without reading the code.

use std::fmt;

/// What went wrong, by kind. The string always carries the specifics (op, shapes, file, setting to change).
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// Shapes or sizes that an op or layer cannot accept.
    Shape(String),
    /// A tensor of the wrong dtype or on the wrong device for an op.
    Mismatch(String),
    /// An invalid model, training or command-line configuration.
    Config(String),
    /// Bad input data: a corrupt file, an inconsistent dataset.
    Data(String),
    /// The GPU, its driver or one of our kernels failed.
    Device(String),
    /// A NaN or infinity where a finite number is required (a loss, a gradient norm).
    NonFinite(String),
    /// An operating-system I/O error, with the path it happened on.
    Io(String),
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, msg) = match self {
            Error::Shape(m) => ("shape error", m),
            Error::Mismatch(m) => ("dtype/device mismatch", m),
            Error::Config(m) => ("configuration error", m),
            Error::Data(m) => ("data error", m),
            Error::Device(m) => ("device error", m),
            Error::NonFinite(m) => ("non-finite value", m),
            Error::Io(m) => ("i/o error", m),
        };
        write!(f, "{kind}: {msg}")
    }
}

impl std::error::Error for Error {}

/// Returns early with an [`Error`] of the given kind, formatted like `format!`.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::Error::$kind(format!($($arg)*)))
    };
}

/// Returns early with an [`Error`] of the given kind unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $kind:ident, $($arg:tt)*) => {
        if !$cond {
            $crate::bail!($kind, $($arg)*);
        }
    };
}
